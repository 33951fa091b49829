"""evaluate: acceptance length and speed-up through vLLM speculative decoding; per-head accuracy."""

from medusa_ray.config import Config
from medusa_ray.errors import UserError


def run(cfg: Config, medusa_dir: str | None = None):
    raise UserError("eval is not implemented yet")
