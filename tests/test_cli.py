import subprocess
import sys

import pytest

from medusa_ray.cli import build_parser

SUBCOMMANDS = ["make-tiny-model", "distill", "train", "export", "eval", "pipeline"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medusa_ray", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: medusa-ray " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, key",
    [(["train", "train.medusa_num_heads=0"], "train.medusa_num_heads"),
     (["distill", "distill.nonsense=1"], "distill.nonsense")],
)
def test_bad_config_is_one_line_error_and_nonzero_exit(args, key):
    result = _cli(*args)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert key in lines[0] and "Traceback" not in result.stderr
