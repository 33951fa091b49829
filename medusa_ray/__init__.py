"""medusa-ray: train speculative-decoding drafters (Medusa heads, EAGLE-3) for any Hugging Face causal LM on Ray."""

__version__ = "0.2.0"

# The built-in drafters register their methods and config keys (cheap: no torch import).
from medusa_ray import drafters  # noqa: E402,F401
