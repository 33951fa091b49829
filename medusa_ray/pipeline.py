"""pipeline: distill -> train -> export -> eval on one Ray cluster, each stage resuming its own output."""

from medusa_ray.config import Config
from medusa_ray.errors import UserError


def run(cfg: Config):
    raise UserError("pipeline is not implemented yet")
