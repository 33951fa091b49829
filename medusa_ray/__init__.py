"""medusa-ray: train Medusa speculative-decoding heads for any Hugging Face causal LM on Ray."""

__version__ = "0.1.0"
