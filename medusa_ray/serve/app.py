"""The app builder a RayService (or ``serve run``) imports: ``medusa_ray.serve.app:build``.

    serveConfigV2:
      applications:
        - name: medusa-ray
          import_path: medusa_ray.serve.app:build
          args: {config: /etc/medusa-ray/config.yaml, draft_dir: /mnt/shared/medusa/export}

The same checks and settings as ``medusa-ray serve``: the drafter against the base (refused in one line before
any replica starts), ``serve.*`` autoscaling and engine settings, traffic capture. ``draft_dir: null`` serves
the plain base; ``overrides`` takes ``section.key=value`` strings like the command line.
"""

from __future__ import annotations

from typing import Any

from medusa_ray.config import load_config


def build(args: dict[str, Any]):
    from medusa_ray.serve import DEFAULT_DRAFT, build_app, served_model

    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    draft = args.get("draft_dir", DEFAULT_DRAFT)
    model = served_model(cfg, cfg.export.output_dir if draft == DEFAULT_DRAFT else draft)
    app, _, _ = build_app(cfg, [model])
    return app
