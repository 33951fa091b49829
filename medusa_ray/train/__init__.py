"""train: Medusa heads on the frozen base model with Ray Train + DeepSpeed."""

from medusa_ray.config import Config
from medusa_ray.errors import UserError


def run(cfg: Config):
    raise UserError("train is not implemented yet")
