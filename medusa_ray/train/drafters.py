"""The two drafters the training loop can train: what is built, how a batch becomes a loss, what is measured.

The loop in ``worker.py`` is the same for both (DeepSpeed over the drafter only, the frozen base, validation,
early stopping, checkpoints, resume); a ``Drafter`` is what differs:

- ``Medusa``: K heads on the base's last hidden state, head k guessing token t+k+2 (``medusa_ray.model``).
- ``Eagle3``: one decoder layer reading three of the base's hidden layers, unrolled over ``eagle3_ttt_steps``
  draft steps in training as vLLM runs it (``medusa_ray.model.eagle3``, on the ``speculators`` library).

Both report per-step stats as a ``[steps, width]`` float64 tensor that sums across micro-batches and ranks,
and both turn validation into an expected acceptance length, ``1 + sum_k prod_{i<=k} p_i``.
"""

from __future__ import annotations

from typing import Any

import torch

from medusa_ray.config import Config
from medusa_ray.data.chat import IGNORE_INDEX


def expected_acceptance(chain: list[float]) -> float:
    """Tokens per verification step if draft position k is accepted with probability ``chain[k]`` given the ones
    before it: ``1 + sum_k prod_{i<=k} chain_i``."""
    total, product = 1.0, 1.0
    for p in chain:
        product *= p
        total += product
    return total


def medusa_metrics(stats: torch.Tensor, head_decay: float, topk: int) -> dict[str, float]:
    """Per-head metrics from summed stats [K, 2 + topk] (loss_sum, n, hits@1..topk)."""
    out: dict[str, float] = {}
    total = 0.0
    for k, row in enumerate(stats.tolist()):
        n = max(row[1], 1.0)
        out[f"medusa{k}_loss"] = row[0] / n
        total += head_decay**k * out[f"medusa{k}_loss"]
        for i in range(topk):
            out[f"medusa{k}_top{i + 1}"] = row[2 + i] / n
    out["loss"] = total
    return out


class Medusa:
    method = "medusa"

    def __init__(self, cfg: Config):
        self.cfg = cfg
        t = cfg.train
        self.steps, self.width = t.medusa_num_heads, 2 + t.topk

    def name(self, k: int) -> str:
        return f"medusa{k}"

    def build(self, base, device, dtype):
        from medusa_ray.model.heads import MedusaHeads

        t = self.cfg.train
        torch.manual_seed(t.seed)
        heads = MedusaHeads(t.medusa_num_heads, t.medusa_num_layers, base.get_output_embeddings().weight,
                            share_lm_head=t.share_lm_head)
        return heads.to(device=device, dtype=dtype)

    def attach(self, decoder) -> None:
        pass

    def loss(self, engine, decoder, batch, device):
        """(loss, stats [K, 2 + topk]: loss sum, positions, hits@1..topk; attention mask)."""
        ids, mask, labels = (x.to(device) for x in batch)
        dtype = next(engine.module.parameters()).dtype
        with torch.no_grad():
            # No KV cache: nothing is generated, and building one costs memory on every step.
            hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state.to(dtype)
        t = self.cfg.train
        loss, stats = engine(hidden, labels=labels, head_decay=t.head_decay, topk=t.topk,
                             chunk_tokens=t.logits_chunk_tokens)
        return loss, stats, mask

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        return medusa_metrics(stats, self.cfg.train.head_decay, self.cfg.train.topk)

    def top1(self, metrics: dict[str, float]) -> list[float]:
        return [metrics[f"medusa{k}_top1"] for k in range(self.steps)]

    def chain(self, metrics: dict[str, float]) -> list[float]:
        # vLLM drafts the heads' top-1 chain; head errors are taken as independent.
        return self.top1(metrics)

    def meta(self, module) -> dict[str, Any]:
        return {"method": self.method, "medusa_num_heads": module.num_heads, "medusa_num_layers": module.num_layers,
                "share_lm_head": module.share_lm_head, "hidden_size": module.hidden_size,
                "vocab_size": module.vocab_size}

    def trainable(self, name: str) -> bool:
        return True


class Eagle3:
    method = "eagle3"
    width = 5

    def __init__(self, cfg: Config, vocab: dict[str, Any] | None = None):
        self.cfg = cfg
        self.steps = cfg.train.eagle3_ttt_steps
        self.vocab = vocab or {}
        self.features = None

    def name(self, k: int) -> str:
        return f"eagle3_step{k}"

    def build(self, base, device, dtype):
        from medusa_ray.model.eagle3 import build_draft

        layer_ids = self.vocab["layer_ids"]
        d2t = torch.tensor(self.vocab["d2t"], dtype=torch.long) if self.vocab.get("d2t") is not None else None
        t2d = torch.tensor(self.vocab["t2d"], dtype=torch.bool) if self.vocab.get("t2d") is not None else None
        torch.manual_seed(self.cfg.train.seed)
        draft = build_draft(self.cfg.model, base.config, layer_ids, d2t, t2d, self.vocab["draft_vocab_size"],
                            self.steps)
        return draft.to(device=device, dtype=dtype)

    def attach(self, decoder) -> None:
        from medusa_ray.model.eagle3 import BaseFeatures

        self.features = BaseFeatures(decoder, self.vocab["layer_ids"])

    def loss(self, engine, decoder, batch, device):
        """(loss, stats [steps, 5]; attention mask): the library's unrolled loss on the packed batch."""
        from speculators.losses import resolve_loss_config

        from medusa_ray.model.eagle3 import LOSS, pack, step_stats

        ids, mask, labels = (x.to(device) for x in batch)
        aux, last = self.features(decoder, ids, mask)
        dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype
        packed, _ = pack(ids, mask, labels, aux, last, IGNORE_INDEX, dtype)
        _, loss, metrics = engine(**packed, ttt_steps=self.steps, ttt_step_loss_decay=self.cfg.train.head_decay,
                                  loss_config=resolve_loss_config(*LOSS))
        return loss, step_stats(metrics, self.steps), mask

    def metrics(self, stats: torch.Tensor) -> dict[str, float]:
        out: dict[str, float] = {}
        total = 0.0
        for k, (loss_sum, n, hits, cond_hits, cond_n) in enumerate(stats.tolist()):
            out[f"eagle3_step{k}_loss"] = loss_sum / max(n, 1.0)
            out[f"eagle3_step{k}_top1"] = hits / max(n, 1.0)
            # Right at step k given steps < k were right: what vLLM's acceptance at position k is.
            out[f"eagle3_step{k}_accept"] = cond_hits / max(cond_n, 1.0)
            total += self.cfg.train.head_decay**k * out[f"eagle3_step{k}_loss"]  # the objective, as Medusa's
        out["loss"] = total
        return out

    def top1(self, metrics: dict[str, float]) -> list[float]:
        return [metrics[f"eagle3_step{k}_top1"] for k in range(self.steps)]

    def chain(self, metrics: dict[str, float]) -> list[float]:
        return [metrics[f"eagle3_step{k}_accept"] for k in range(self.steps)]

    def meta(self, module) -> dict[str, Any]:
        config = module.config
        return {"method": self.method, "eagle3_ttt_steps": self.steps, "eagle3_layer_ids": self.vocab["layer_ids"],
                "eagle3_draft_vocab_size": self.vocab["draft_vocab_size"],
                "hidden_size": int(config.transformer_layer_config.hidden_size),
                "vocab_size": int(config.transformer_layer_config.vocab_size)}

    def trainable(self, name: str) -> bool:
        # What a checkpoint keeps: the trained layers and the vocabulary maps. The embeddings and the vocabulary
        # projection are the base's own (frozen), rebuilt from it at export.
        from medusa_ray.model.eagle3 import FROM_BASE

        return not name.startswith(FROM_BASE)


def drafter(cfg: Config, vocab: dict[str, Any] | None = None):
    return Eagle3(cfg, vocab) if cfg.train.method == "eagle3" else Medusa(cfg)


def eagle3_vocab(cfg_dict: dict[str, Any], plan_dict: dict[str, Any]) -> dict[str, Any]:
    """EAGLE-3's draft vocabulary and layers for a run: the ``eagle3_draft_vocab_size`` most frequent tokens of
    the training rows' replies (what the draft must predict), as the vocabulary maps vLLM reads. A Ray task: it
    streams every training row once. The same data and config always give the same maps (a resumed run's)."""
    from transformers import AutoConfig

    from medusa_ray.model.eagle3 import aux_layer_ids, token_counts, vocab_maps
    from medusa_ray.train.data import tokenize_batch
    from medusa_ray.train.plan import DataPlan, RowReader, batches, epoch_units

    cfg = Config.model_validate(cfg_dict)
    plan = DataPlan.from_dict(plan_dict)
    t = cfg.train
    base = AutoConfig.from_pretrained(cfg.model)
    base = base.get_text_config() if hasattr(base, "get_text_config") else base
    counts: dict[int, int] = {}
    reader = RowReader(plan.columns)
    for batch in batches(epoch_units(plan, t.seed, 0, 0, 1), reader, 256):
        for token, n in token_counts(tokenize_batch(batch, cfg.model, t.max_length)["labels"], IGNORE_INDEX).items():
            counts[int(token)] = counts.get(int(token), 0) + n
    vocab_size = int(base.vocab_size)
    size = min(t.eagle3_draft_vocab_size, vocab_size)
    from collections import Counter

    d2t, t2d = vocab_maps(Counter(counts), size, vocab_size)
    covered = sum(n for token, n in counts.items() if t2d is None or bool(t2d[token]))
    return {"layer_ids": aux_layer_ids(int(base.num_hidden_layers), t.eagle3_layers), "draft_vocab_size": size,
            "d2t": d2t.tolist() if d2t is not None else None, "t2d": t2d.tolist() if t2d is not None else None,
            "coverage": covered / max(sum(counts.values()), 1)}
