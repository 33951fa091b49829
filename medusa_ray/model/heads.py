"""Medusa heads: K small residual stacks on the base model's last hidden state, one vocab projection each.

The module's ``state_dict`` *is* the FasterDecoding/TGI layout, so export needs no key renaming:

    {k}.{j}.linear.weight, {k}.{j}.linear.bias   residual block j of head k   (j < L)
    {k}.{L}.weight                                vocab projection of head k

Head k (0-based) at position t predicts token t + k + 2; the base model's own lm_head covers t + 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class ResBlock(nn.Module):
    """x + SiLU(Wx + b), zero-initialised so an untrained head starts as the base lm_head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeads(nn.ModuleList):
    """``num_heads`` heads of ``num_layers`` independent ResBlocks, then a vocab projection.

    ``lm_head_weight`` (the frozen base ``lm_head``) initialises each head's projection, or, with
    ``share_lm_head``, is kept as a non-trainable buffer that every head projects through.
    Each block is its own module: FasterDecoding's ``[ResBlock] * L`` repeats one module by accident.
    """

    def __init__(self, num_heads: int, num_layers: int, lm_head_weight: torch.Tensor, share_lm_head: bool = False):
        vocab_size, hidden_size = lm_head_weight.shape
        heads = []
        for _ in range(num_heads):
            blocks: list[nn.Module] = [ResBlock(hidden_size) for _ in range(num_layers)]
            if not share_lm_head:
                proj = nn.Linear(hidden_size, vocab_size, bias=False)
                with torch.no_grad():
                    proj.weight.copy_(lm_head_weight)
                blocks.append(proj)
            heads.append(nn.Sequential(*blocks))
        super().__init__(heads)
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.hidden_size = hidden_size
        self.vocab_size = vocab_size
        self.share_lm_head = share_lm_head
        if share_lm_head:
            # A buffer, not a parameter: never trained, never partitioned by ZeRO-3, never in the optimizer.
            self.register_buffer("shared_lm_head", lm_head_weight.detach().clone(), persistent=False)

    def hidden(self, k: int, x: torch.Tensor) -> torch.Tensor:
        """Head k's residual stack (everything before the vocab projection)."""
        head = self[k]
        for j in range(self.num_layers):
            x = head[j](x)
        return x

    def project(self, k: int, h: torch.Tensor) -> torch.Tensor:
        """Head k's vocab logits for hidden states ``h``."""
        if self.share_lm_head:
            return F.linear(h, self.shared_lm_head.to(h.dtype))
        return self[k][self.num_layers](h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Full logits of every head; fine for inference on a few positions, not for training batches."""
        return [self.project(k, self.hidden(k, x)) for k in range(self.num_heads)]
