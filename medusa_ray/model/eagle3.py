"""EAGLE-3 drafts, on vLLM's ``speculators`` library: its draft model, loss, training-time unroll and save format.

Why the library and not our own module: vLLM 0.32 loads exactly what ``Eagle3DraftModel.save_pretrained`` writes
(``speculators_model_type: eagle3``), and the part that is easy to get subtly wrong, the training-time-test
unroll (each draft step attends to the previous steps' own hidden states with a block-diagonal mask, loss
decayed per step), is the library's, tested against vLLM by its authors. What is ours is everything around
it: the three auxiliary hidden states computed online from the frozen base inside the training worker, the
draft vocabulary from the distilled replies, packing our padded batches into the library's one-row layout,
and the metrics our validation and early stopping read.

Layers: vLLM captures the residual stream *after* layer ``i`` (``i = 0``: the embeddings, ``i = n``: the last
layer's output before the final norm) at the ids the draft's config names, by default ``(2, n // 2, n - 3)``.
That is the input of decoder layer ``i`` (for ``i < n``) or of the final norm, which is where we take them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import torch

from medusa_ray.logs import verbose

ATTENTION = "sdpa"
"""Draft attention in training: sdpa trains on CPU and GPU (the library's flex attention has no CPU backward)."""
FROM_BASE = ("embed_tokens", "lm_head", "verifier_")
"""The draft's parameters that are the base's own (frozen; rebuilt from the base, never checkpointed)."""
LOSS = ("kl_div", "eager")
"""KL to the base's own next-token distribution over the draft vocabulary; "eager" needs no Triton."""


def aux_layer_ids(num_layers: int, explicit: list[int] | None = None) -> list[int]:
    """The three residual-stream positions the draft reads: vLLM's default ``(2, n // 2, n - 3)``, or for models
    too shallow for it, the embeddings, the middle and the last layer."""
    if explicit:
        ids = sorted(explicit)
    else:
        ids = [2, num_layers // 2, num_layers - 3]
        if len(set(ids)) < 3 or ids != sorted(ids) or ids[0] < 0:
            ids = [0, num_layers // 2, num_layers]
    if len(ids) != 3 or len(set(ids)) != 3 or ids[0] < 0 or ids[-1] > num_layers:
        raise ValueError(f"EAGLE-3 reads 3 distinct layers in 0..{num_layers}, got {ids}")
    return ids


def vocab_maps(token_counts: Counter, draft_vocab_size: int, vocab_size: int):
    """``(d2t, t2d)`` for the ``draft_vocab_size`` most frequent reply tokens (None, None: the whole vocabulary).
    ``d2t[i]`` is the offset from draft id ``i`` to its target id, ``t2d`` marks target ids in the draft vocab,
    as vLLM reads them."""
    if draft_vocab_size >= vocab_size:
        return None, None
    from speculators.train.vocab_mapping import build_vocab_mappings_from_distribution

    return build_vocab_mappings_from_distribution(dict(token_counts), draft_vocab_size, vocab_size)


def draft_layer_config(base_config: Any):
    """The draft's one decoder layer, shaped like the base's (its hidden size must equal the base's)."""
    import copy

    from transformers import LlamaConfig

    base = base_config.get_text_config() if hasattr(base_config, "get_text_config") else base_config
    config = LlamaConfig(
        vocab_size=base.vocab_size,
        hidden_size=base.hidden_size,
        intermediate_size=base.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=base.num_attention_heads,
        num_key_value_heads=base.num_key_value_heads,
        head_dim=getattr(base, "head_dim", None) or base.hidden_size // base.num_attention_heads,
        hidden_act=base.hidden_act,
        max_position_embeddings=base.max_position_embeddings,
        initializer_range=getattr(base, "initializer_range", 0.02),
        rms_norm_eps=base.rms_norm_eps,
        tie_word_embeddings=False,
        pad_token_id=base.pad_token_id,
        eos_token_id=base.eos_token_id,
        bos_token_id=base.bos_token_id,
    )
    config.rope_parameters = copy.deepcopy(getattr(base, "rope_parameters", None))
    return config


def _library():
    """The library logs through loguru, straight to stderr: its notes (which file it loads a layer from) are
    for ``--verbose`` only."""
    from loguru import logger


    (logger.enable if verbose() else logger.disable)("speculators")


def build_draft(base_name: str, base_config: Any, layer_ids: list[int], d2t, t2d, draft_vocab_size: int,
                ttt_steps: int):
    """A fresh ``Eagle3DraftModel``: embeddings, the vocabulary projection (the base ``lm_head`` rows of the draft
    vocabulary) and the base's final norm copied from ``base_name`` by the library; the rest trainable."""
    _library()
    from speculators.models.eagle3 import Eagle3DraftModel

    return Eagle3DraftModel.from_training_args(
        verifier_config=draft_layer_config(base_config),  # the library's name for the draft layer's config
        t2d=t2d,
        d2t=d2t,
        verifier_name_or_path=base_name,
        draft_vocab_size=draft_vocab_size,
        target_layer_ids=layer_ids,
        norm_before_residual=True,
        norm_before_fc=True,
        norm_output=True,
        embed_requires_grad=False,
        ttt_steps=ttt_steps,
        draft_attn_impl=ATTENTION,
    )


class BaseFeatures:
    """Forward hooks on the frozen base's decoder that keep the residual stream at the draft's layers and before
    the final norm, for one forward at a time."""

    def __init__(self, decoder, layer_ids: list[int]):
        self.layer_ids = layer_ids
        self.num_layers = len(decoder.layers)
        self._seen: dict[int, torch.Tensor] = {}
        for i in set(layer_ids) | {self.num_layers}:
            module = decoder.norm if i == self.num_layers else decoder.layers[i]
            module.register_forward_pre_hook(self._keeper(i), with_kwargs=True)

    def _keeper(self, i: int):
        def keep(_module, args, kwargs):
            self._seen[i] = args[0] if args else kwargs["hidden_states"]

        return keep

    @torch.no_grad()
    def __call__(self, decoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(aux [B, T, 3H], last [B, T, H])`` for a right-padded batch."""
        self._seen.clear()
        decoder(input_ids=ids, attention_mask=mask, use_cache=False)
        aux = torch.cat([self._seen[i] for i in self.layer_ids], dim=-1)
        return aux, self._seen[self.num_layers]


def pack(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, aux: torch.Tensor, last: torch.Tensor,
         ignore_index: int, dtype) -> tuple[dict[str, torch.Tensor], int]:
    """Our padded batch -> the library's layout: every conversation shifted (slot t gets token t+1 and the base's
    state at t) and packed into one row, ``document_ids`` telling them apart. Returns (batch, loss positions)."""
    from speculators.models.eagle3 import shift_batch

    rows = []
    for b in range(ids.shape[0]):
        n = int(mask[b].sum())
        if n < 2:
            continue
        rows.append(shift_batch({
            "input_ids": ids[b, :n],
            "hidden_states": aux[b, :n].to(dtype),
            "verifier_last_hidden_states": last[b, :n].to(dtype),
            "loss_mask": labels[b, :n] != ignore_index,
            "lengths": torch.tensor([n]),
            "position_ids": torch.arange(n, device=ids.device),
        }))
    if not rows:  # a micro-batch of skipped rows: one inert position keeps the ranks in step
        rows = [{"input_ids": ids[0, :1], "hidden_states": aux[0, :1].to(dtype),
                 "verifier_last_hidden_states": last[0, :1].to(dtype),
                 "loss_mask": torch.zeros(1, dtype=torch.bool, device=ids.device),
                 "position_ids": torch.zeros(1, dtype=torch.long, device=ids.device)}]
    keys = ("input_ids", "hidden_states", "verifier_last_hidden_states", "loss_mask", "position_ids")
    batch = {k: torch.cat([r[k] for r in rows])[None] for k in keys}
    batch["document_ids"] = torch.cat([torch.full_like(r["input_ids"], d) for d, r in enumerate(rows)])[None]
    return batch, int(batch["loss_mask"].sum())


def step_stats(metrics: dict[str, Any], steps: int) -> torch.Tensor:
    """The library's per-step sums -> ``[steps, 5]``: loss sum, positions, hits, hits after correct steps, and
    the positions where every earlier step was correct."""
    rows = []
    for k in range(steps):
        positions = float(metrics[f"full_acc_{k}_total"])
        # The library reports step k's loss as this batch's mean: weigh it by positions to sum across batches.
        rows.append([float(metrics[f"loss_{k}_sum"]) * positions, positions, float(metrics[f"full_acc_{k}_sum"]),
                     float(metrics[f"cond_acc_{k}_sum"]), float(metrics[f"cond_acc_{k}_total"])])
    return torch.tensor(rows, dtype=torch.float64)


def token_counts(label_rows: Iterable[list[int]], ignore_index: int) -> Counter:
    counts: Counter = Counter()
    for labels in label_rows:
        counts.update(t for t in labels if t != ignore_index)
    return counts
