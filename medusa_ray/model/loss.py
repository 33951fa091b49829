"""Medusa training loss: per-head cross-entropy over label-carrying positions, never the full logits.

At a 128k vocabulary the logits of one head for a batch of 8 x 512 tokens are 2 GiB in fp32, and a
plain ``F.cross_entropy(head(h), y)`` keeps them (and their softmax) alive until backward, per head.
``linear_cross_entropy`` instead walks the rows in chunks and, while each chunk's logits exist, also
computes that chunk's gradients with respect to the hidden states and the projection weight (the
softmax-minus-one-hot trick). Backward then only rescales what forward already computed, so peak
memory is one chunk of logits and there is no recomputation, unlike activation checkpointing.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from medusa_ray.data import IGNORE_INDEX  # noqa: F401 - heads.py takes it from here


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk_tokens: int, topk: int):
        n = h.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        correct = torch.zeros(topk, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if need_h else None
        # The weight gradient sums over every chunk: in bf16 that sum loses precision chunk by chunk, so it
        # accumulates in fp32 and is cast once, in backward.
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        k = min(topk, weight.shape[0])
        for start in range(0, n, chunk_tokens):
            hc, yc = h[start : start + chunk_tokens], target[start : start + chunk_tokens]
            logits = (hc @ weight.t()).float()
            lse = torch.logsumexp(logits, dim=-1)
            loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            hit = logits.topk(k, dim=-1).indices.eq(yc[:, None])
            # hit has at most one True per row; a running OR over ranks gives "in the top i".
            correct[:k] += hit.cumsum(dim=1).clamp_(max=1).sum(dim=0).float()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits' memory
                probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0
                if need_h:
                    torch.mm(probs.to(weight.dtype), weight, out=grad_h[start : start + chunk_tokens])
                if need_w:
                    grad_w.addmm_(probs.t(), hc.float())
            del logits
        if k < topk:  # a vocabulary smaller than topk: every target is within the top |V|
            correct[k:] = correct[k - 1] if k else 0.0
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype))
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.float()).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk_tokens: int = 1024, topk: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``h @ weight.T`` against ``target`` and top-1..topk hit counts.

    ``h`` is [N, H] (only rows that carry a label), ``weight`` [V, H], ``target`` [N] of token ids.
    Returns ``(loss_sum, correct)`` with ``correct[i]`` = rows whose target is in the top i+1 logits.
    """
    # No early return for N == 0: the call must stay in the graph (zero grads) so every rank runs
    # the same modules, which ZeRO-3's parameter gathering requires.
    return _LinearCrossEntropy.apply(h, weight, target, chunk_tokens, topk)


def reference_cross_entropy(h, weight, target, topk: int = 1):
    """The straightforward version (full logits), for tests and benchmarks."""
    logits = (h @ weight.t()).float()
    loss = F.cross_entropy(logits, target, reduction="sum")
    hit = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.eq(target[:, None])
    return loss, hit.cumsum(dim=1).clamp(max=1).sum(dim=0).float()
