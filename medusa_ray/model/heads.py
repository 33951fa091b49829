"""Medusa heads: K small residual stacks on the base model's last hidden state, one vocab projection each.

The module's ``state_dict`` *is* the FasterDecoding/TGI layout, so export needs no key renaming:

    {k}.{j}.linear.weight, {k}.{j}.linear.bias   residual block j of head k   (j < L)
    {k}.{L}.weight                                vocab projection of head k

Head k (0-based) at position t predicts token t + k + 2; the base model's own lm_head covers t + 1.
With soft targets, head k also learns the base's own distribution for that token: the base lm_head applied to
the base's last hidden state at position t + k + 1.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from medusa_ray.model.loss import IGNORE_INDEX, linear_cross_entropy


class ResBlock(nn.Module):
    """x + SiLU(Wx + b), zero-initialised so an untrained head starts as the base lm_head."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class VocabProjection(nn.Linear):
    """A head's vocab projection (``{k}.{L}.weight``). Called with ``target`` it returns the chunked
    cross-entropy instead of logits: the loss has to run inside this module's forward so that ZeRO-3
    has gathered the weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.weight.copy_(weight)

    def forward(self, h: torch.Tensor, target: torch.Tensor | None = None, chunk_tokens: int = 1024, topk: int = 1,
                **soft):
        if target is None:
            return F.linear(h, self.weight)
        return linear_cross_entropy(h, self.weight, target, chunk_tokens, topk, **soft)


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
                blocks.append(VocabProjection(lm_head_weight.detach()))
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

    def head_loss(self, k: int, h: torch.Tensor, target: torch.Tensor, chunk_tokens: int, topk: int, **soft):
        """Head k's summed cross-entropy and top-1..topk hit counts for hidden states ``h`` [N, H]; ``soft``:
        ``linear_cross_entropy``'s soft-target arguments."""
        z = self.hidden(k, h)
        if self.share_lm_head:
            return linear_cross_entropy(z, self.shared_lm_head.to(z.dtype), target, chunk_tokens, topk, **soft)
        return self[k][self.num_layers](z, target, chunk_tokens, topk, **soft)

    def forward(
        self,
        hidden: torch.Tensor,
        labels: torch.Tensor | None = None,
        head_decay: float = 0.8,
        topk: int = 1,
        chunk_tokens: int = 1024,
        soft_target_weight: float = 0.0,
        base_lm_head: torch.Tensor | None = None,
    ):
        """Without ``labels``: full logits of every head (inference on a few positions).

        With ``labels`` [B, T] (``-100`` = no label): the training loss, as ``(loss, stats)`` where
        ``loss = sum_k head_decay**k * mean CE of head k`` over the positions whose target token
        (t + k + 2) carries a label, and ``stats`` [K, 2 + topk] holds per head the summed loss, the
        number of positions and the top-1..topk hit counts (detached, summable across ranks).

        ``hidden`` is the base's last hidden state (the input of its ``lm_head``). With ``soft_target_weight``
        w > 0 head k's target at t is ``(1 - w) * onehot(label[t + k + 2]) + w * softmax(base_lm_head @
        hidden[t + k + 1])``, the base's own distribution for that token; ``base_lm_head`` is the frozen base
        ``lm_head`` weight [V, H] (default: the shared one, with ``share_lm_head``). Top-k hits stay against
        the hard label.
        """
        if labels is None:
            return [self.project(k, self.hidden(k, hidden)) for k in range(self.num_heads)]
        soft = soft_target_weight > 0.0
        if soft and base_lm_head is None:
            if not self.share_lm_head:
                raise ValueError("soft targets need the base lm_head weight (base_lm_head)")
            base_lm_head = self.shared_lm_head
        total = hidden.new_zeros((), dtype=torch.float32)
        stats = []
        seq_len = hidden.shape[1]
        for k in range(self.num_heads):
            shift = k + 2
            target = labels[:, shift:]
            keep = target != IGNORE_INDEX
            h = hidden[:, : max(seq_len - shift, 0)][keep]
            y = target[keep]
            extra = {}
            if soft:  # the base's output one position before the target: t + k + 1, always in the sequence
                extra = {"soft_h": hidden[:, k + 1 : k + 1 + max(seq_len - shift, 0)][keep],
                         "soft_weight": base_lm_head, "soft_target_weight": soft_target_weight}
            loss_sum, correct = self.head_loss(k, h, y, chunk_tokens, topk, **extra)
            n = y.numel()
            total = total + (head_decay**k) * loss_sum / max(n, 1)
            stats.append(torch.cat([loss_sum.detach().reshape(1), loss_sum.new_tensor([n]), correct]))
        return total, torch.stack(stats)
