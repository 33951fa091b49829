"""Medusa training loss: per-head cross-entropy over label-carrying positions, never the full logits.

At a 128k vocabulary the logits of one head for a batch of 8 x 512 tokens are 2 GiB in fp32, and a
plain ``F.cross_entropy(head(h), y)`` keeps them (and their softmax) alive until backward, per head.
``linear_cross_entropy`` instead walks the rows in chunks and, while each chunk's logits exist, also
computes that chunk's gradients with respect to the hidden states and the projection weight (the
softmax-minus-one-hot trick). Backward then only rescales what forward already computed, so peak
memory is one chunk of logits and there is no recomputation, unlike activation checkpointing.

Soft targets (``soft_target_weight`` w > 0): each row's target is the mixture ``(1 - w) * onehot(y) + w * p`` with
``p = softmax(soft_weight @ soft_h)``, the base's own distribution for that token (the base ``lm_head`` applied to
the base's hidden state one position before the target). The base logits are formed chunk by chunk too, in fp32,
and exist only while their chunk is processed; the loss is the cross-entropy against the mixture (soft CE = KL(p||q)
plus p's entropy, a constant) and the logits' gradient ``q - target``. A chunk then holds two [rows, V] fp32 blocks
instead of one, so it takes half the rows: peak memory stays what ``chunk_tokens`` allows without soft targets.
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from medusa_ray.data import IGNORE_INDEX  # noqa: F401 - heads.py takes it from here


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk_tokens: int, topk: int, soft_h=None, soft_weight=None,
                soft_w: float = 0.0):
        n = h.shape[0]
        soft = soft_h is not None and soft_w > 0.0
        if soft:  # two fp32 [rows, V] blocks per chunk (head and base logits): half the rows keeps the peak
            chunk_tokens = max(1, chunk_tokens // 2)
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
            p = None
            if not soft:
                loss += (lse - logits.gather(1, yc[:, None]).squeeze(1)).sum()
            else:
                # The base's distribution p for these rows' tokens, in fp32 (in place: one block of memory).
                sc = soft_h[start : start + chunk_tokens]
                p = (sc.to(soft_weight.dtype) @ soft_weight.t()).float()
                p = p.sub_(torch.logsumexp(p, dim=-1, keepdim=True)).exp_()
                # CE against (1-w) onehot(y) + w p = lse - (1-w) logit[y] - w <p, logits>   (sum p = 1)
                p_dot = torch.bmm(p.unsqueeze(1), logits.unsqueeze(2)).view(-1)
                hard = logits.gather(1, yc[:, None]).squeeze(1)
                loss += (lse - (1.0 - soft_w) * hard - soft_w * p_dot).sum()
            hit = logits.topk(k, dim=-1).indices.eq(yc[:, None])
            # hit has at most one True per row; a running OR over ranks gives "in the top i".
            correct[:k] += hit.cumsum(dim=1).clamp_(max=1).sum(dim=0).float()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, reusing the logits' memory
                if not soft:
                    probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0
                else:  # q - ((1-w) onehot(y) + w p)
                    probs.sub_(p, alpha=soft_w)
                    if soft_w < 1.0:
                        probs[torch.arange(len(yc), device=yc.device), yc] -= 1.0 - soft_w
                if need_h:
                    torch.mm(probs.to(weight.dtype), weight, out=grad_h[start : start + chunk_tokens])
                if need_w:
                    grad_w.addmm_(probs.t(), hc.float())
            del logits, p
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
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk_tokens: int = 1024, topk: int = 1,
    soft_h: torch.Tensor | None = None, soft_weight: torch.Tensor | None = None, soft_target_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``h @ weight.T`` against ``target`` and top-1..topk hit counts.

    ``h`` is [N, H] (only rows that carry a label), ``weight`` [V, H], ``target`` [N] of token ids.
    Returns ``(loss_sum, correct)`` with ``correct[i]`` = rows whose target is in the top i+1 logits.

    With ``soft_target_weight`` w > 0, ``soft_h`` [N, H'] and ``soft_weight`` [V, H'] (frozen, never given
    gradients), row i's target is ``(1 - w) * onehot(target[i]) + w * softmax(soft_weight @ soft_h[i])``.
    ``correct`` still counts the hard ``target``. w = 0 is exactly the hard-label loss.
    """
    # No early return for N == 0: the call must stay in the graph (zero grads) so every rank runs
    # the same modules, which ZeRO-3's parameter gathering requires.
    if soft_target_weight > 0.0:
        if soft_h is None or soft_weight is None:
            raise ValueError("soft targets need soft_h and soft_weight")
        if soft_h.shape[0] != h.shape[0] or soft_weight.shape[0] != weight.shape[0]:
            raise ValueError(f"soft targets: {tuple(soft_h.shape)} rows x {tuple(soft_weight.shape)} base lm_head "
                             f"for {tuple(h.shape)} rows x {tuple(weight.shape)} head projection")
        return _LinearCrossEntropy.apply(h, weight, target, chunk_tokens, topk, soft_h.detach(),
                                         soft_weight.detach(), float(soft_target_weight))
    return _LinearCrossEntropy.apply(h, weight, target, chunk_tokens, topk)


def reference_cross_entropy(h, weight, target, topk: int = 1):
    """The straightforward version (full logits), for tests and benchmarks."""
    logits = (h @ weight.t()).float()
    loss = F.cross_entropy(logits, target, reduction="sum")
    hit = logits.topk(min(topk, logits.shape[-1]), dim=-1).indices.eq(target[:, None])
    return loss, hit.cumsum(dim=1).clamp(max=1).sum(dim=0).float()
