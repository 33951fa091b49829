"""distill: regenerate every assistant turn with the base model (Ray Data -> Ray Serve vLLM -> Parquet)."""

from medusa_ray.config import Config
from medusa_ray.errors import UserError


def run(cfg: Config):
    raise UserError("distill is not implemented yet")
