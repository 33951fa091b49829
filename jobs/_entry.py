"""What every ``jobs/<stage>.py`` does: parse arguments exactly like the CLI, join the cluster the job
runs in, run one stage.

Under ``ray job submit`` the driver runs on the cluster with ``RAY_ADDRESS`` set, so ``ray.address``
defaults to ``auto`` here (join, never start a private cluster). Pass ``ray.address=`` (empty) to start
a local one anyway, or ``ray.address=ray://HOST:10001`` to drive a remote cluster from a laptop.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python jobs/x.py` puts jobs/ on sys.path, not the project root. Ray's working_dir adds the root to
# PYTHONPATH, but a plain `python jobs/x.py` on a head node should import the same checkout too.
_ROOT = Path(__file__).resolve().parents[1]
if (_ROOT / "medusa_ray").is_dir() and str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))


def main(stage: str, argv: list[str] | None = None) -> int:
    from medusa_ray import cli
    from medusa_ray.cluster import init_ray

    argv = sys.argv[1:] if argv is None else argv
    parser = cli.build_parser()
    parser.prog = f"jobs/{stage}.py"
    args = parser.parse_args([stage, *argv])

    def join(cfg) -> None:
        if cfg.ray.address is None:
            cfg.ray.address = "auto"
        _join(cfg, init_ray)

    return cli.execute(args, f"jobs/{stage}.py", before_stage=join)


def _join(cfg, init_ray) -> None:
    """Connect before the stage starts, so a missing cluster is one clear line, not a stage traceback."""
    from medusa_ray.errors import UserError

    try:
        init_ray(cfg.ray)
    except ConnectionError as exc:
        raise UserError(
            f"no Ray cluster at ray.address={cfg.ray.address!r} ({str(exc).splitlines()[0]}); submit with "
            "`ray job submit`, start one with `ray start --head`, or pass `ray.address=` to run locally"
        ) from None
