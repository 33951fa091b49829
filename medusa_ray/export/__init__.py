"""export: consolidate a training checkpoint into a directory that vLLM and TGI load."""

from medusa_ray.config import Config
from medusa_ray.errors import UserError


def run(cfg: Config, checkpoint: str | None = None):
    raise UserError("export is not implemented yet")
