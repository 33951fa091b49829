"""EAGLE-3: one decoder layer reading three of the base's hidden layers, drafting ``eagle3_ttt_steps`` tokens a step.

Built on the ``speculators`` library (``medusa_ray.model.eagle3``): training unrolls the draft over its own outputs
as vLLM runs it, from a vocabulary of the tokens the base most often says. The export is what speculators'
``Eagle3DraftModel.save_pretrained`` writes (``config.json`` with ``speculators_model_type: eagle3``, the aux layer
ids and the verifier; ``model.safetensors`` with the trained layer, the draft vocabulary's projection and
embeddings from the base, and the ``d2t``/``t2d`` maps), which vLLM loads as ``speculative_config={"method":
"eagle3", "model": DIR}``. The checkpoint holds only what training changed (and the maps); the frozen parts come
from the base model at export, as they did in training. TGI does not serve EAGLE drafts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Optional

from pydantic import Field

from medusa_ray.config import Config, DrafterKeys
from medusa_ray.drafters import Drafter, register
from medusa_ray.errors import UserError

WEIGHTS_FILE = "model.safetensors"


class Eagle3Keys(DrafterKeys):
    eagle3_ttt_steps: int = Field(3, ge=1, le=8)
    """EAGLE-3: draft steps unrolled in training (each step reads the draft's own previous output, as in vLLM);
    also the tokens vLLM drafts per step unless ``eval.num_speculative_tokens`` says otherwise."""
    eagle3_draft_vocab_size: int = Field(32000, ge=16)
    """EAGLE-3: the draft's vocabulary, the most frequent tokens of the distilled replies (the base's whole
    vocabulary when that is smaller)."""
    eagle3_layers: Optional[list[int]] = None
    """EAGLE-3: the three residual-stream positions of the base the draft reads (0: the embeddings, n: the last
    layer's output). Default: vLLM's ``(2, n // 2, n - 3)``, or ``(0, n // 2, n)`` for models too shallow."""


@register
class Eagle3(Drafter):
    method = "eagle3"
    title = "EAGLE-3 draft"
    position = "step"
    keys = Eagle3Keys
    meta_keys = ("eagle3_ttt_steps", "eagle3_layer_ids", "eagle3_draft_vocab_size")
    weights_file = WEIGHTS_FILE
    needs_preparation = True
    width = 5

    def __init__(self, cfg, prepared=None):
        super().__init__(cfg, prepared)
        self.steps = cfg.train.eagle3_ttt_steps
        self.base_features = None

    # ---- config -------------------------------------------------------------------------------------------
    @classmethod
    def num_positions(cls, train_cfg) -> int:
        return train_cfg.eagle3_ttt_steps

    @classmethod
    def shape(cls, train_cfg, hidden_size: int, vocab_size: int) -> dict[str, Any]:
        return {"method": cls.method, "eagle3_ttt_steps": train_cfg.eagle3_ttt_steps,
                "eagle3_draft_vocab_size": min(train_cfg.eagle3_draft_vocab_size, vocab_size),
                "hidden_size": hidden_size, "vocab_size": vocab_size}

    @classmethod
    def prepare(cls, cfg: Config, label_rows: Iterable[list[int]]) -> dict[str, Any]:
        """The draft vocabulary and layers for a run: the ``eagle3_draft_vocab_size`` most frequent tokens of the
        training rows' replies (what the draft must predict), as the maps vLLM reads. The same data and config
        always give the same maps (a resumed run's)."""
        from collections import Counter

        from transformers import AutoConfig

        from medusa_ray.data import IGNORE_INDEX
        from medusa_ray.model.eagle3 import aux_layer_ids, token_counts, vocab_maps

        t = cfg.train
        base = AutoConfig.from_pretrained(cfg.model)
        base = base.get_text_config() if hasattr(base, "get_text_config") else base
        counts = Counter({int(token): n for token, n in token_counts(label_rows, IGNORE_INDEX).items()})
        vocab_size = int(base.vocab_size)
        size = min(t.eagle3_draft_vocab_size, vocab_size)
        d2t, t2d = vocab_maps(counts, size, vocab_size)
        covered = sum(n for token, n in counts.items() if t2d is None or bool(t2d[token]))
        return {"layer_ids": aux_layer_ids(int(base.num_hidden_layers), t.eagle3_layers), "draft_vocab_size": size,
                "d2t": d2t.tolist() if d2t is not None else None, "t2d": t2d.tolist() if t2d is not None else None,
                "coverage": covered / max(sum(counts.values()), 1)}

    @classmethod
    def describe_training(cls, train_cfg, prepared) -> str:
        return (f"an EAGLE-3 draft ({train_cfg.eagle3_ttt_steps} steps, layers {prepared['layer_ids']}, draft "
                f"vocabulary {prepared['draft_vocab_size']} covering {prepared['coverage']:.1%} of reply tokens)")

    @classmethod
    def summary_columns(cls, train_cfg) -> list[str]:
        return ["top1", "accept"]

    # ---- training ----------------------------------------------------------------------------------------
    def name(self, k: int) -> str:
        return f"eagle3_step{k}"

    def build(self, base, device, dtype):
        import torch

        from medusa_ray.model.eagle3 import build_draft

        vocab = self.prepared
        d2t = torch.tensor(vocab["d2t"], dtype=torch.long) if vocab.get("d2t") is not None else None
        t2d = torch.tensor(vocab["t2d"], dtype=torch.bool) if vocab.get("t2d") is not None else None
        torch.manual_seed(self.cfg.train.seed)
        draft = build_draft(self.cfg.model, base.config, vocab["layer_ids"], d2t, t2d, vocab["draft_vocab_size"],
                            self.steps)
        return draft.to(device=device, dtype=dtype)

    def attach(self, decoder) -> None:
        from medusa_ray.model.eagle3 import BaseFeatures

        self.base_features = BaseFeatures(decoder, self.prepared["layer_ids"])

    @classmethod
    def feature_layers(cls, train_cfg) -> int:
        return 4  # three auxiliary layers and the last

    def features(self, decoder, ids, mask) -> dict[str, Any]:
        aux, last = self.base_features(decoder, ids, mask)
        return {"aux": aux, "last": last}

    def loss(self, engine, features, batch, device):
        """(loss, stats [steps, 5]; attention mask): the library's unrolled loss on the packed batch."""
        from speculators.losses import resolve_loss_config

        from medusa_ray.data import IGNORE_INDEX
        from medusa_ray.model.eagle3 import LOSS, pack, step_stats

        ids, mask, labels = (x.to(device) for x in batch)
        aux, last = features["aux"].to(device), features["last"].to(device)
        dtype = next(p for p in engine.module.parameters() if p.requires_grad).dtype
        packed, _ = pack(ids, mask, labels, aux, last, IGNORE_INDEX, dtype)
        _, loss, metrics = engine(**packed, ttt_steps=self.steps, ttt_step_loss_decay=self.cfg.train.head_decay,
                                  loss_config=resolve_loss_config(*LOSS))
        return loss, step_stats(metrics, self.steps), mask

    def metrics(self, stats) -> dict[str, float]:
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

    def chain(self, metrics: dict[str, float]) -> list[float]:
        return [metrics[f"eagle3_step{k}_accept"] for k in range(self.steps)]

    def meta(self, module) -> dict[str, Any]:
        return {"eagle3_ttt_steps": self.steps, "eagle3_layer_ids": self.prepared["layer_ids"],
                "eagle3_draft_vocab_size": self.prepared["draft_vocab_size"]}

    def trainable(self, name: str) -> bool:
        # What a checkpoint keeps: the trained layers and the vocabulary maps. The embeddings and the vocabulary
        # projection are the base's own (frozen), rebuilt from it at export.
        from medusa_ray.model.eagle3 import FROM_BASE

        return not name.startswith(FROM_BASE)

    # ---- export ------------------------------------------------------------------------------------------
    @classmethod
    def export_files(cls, weights: dict, meta: dict[str, Any], base_name: str, dtype, published_base: str):
        draft = _draft_from_checkpoint(weights, meta, base_name)

        def write(tmp: Path) -> None:
            """The library's own layout; ``verifier_*`` (the base's final norm and head, used only to make training
            targets) is not part of it. The verifier is named as published (vLLM only checks the key is there)."""
            draft.to(dtype).save_pretrained(tmp)
            (tmp / "config.py").unlink(missing_ok=True)  # transformers copies the config class's source
            config = json.loads((tmp / "config.json").read_text())
            config["speculators_config"]["verifier"]["name_or_path"] = published_base
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")

        return write

    @classmethod
    def describe(cls, meta: dict[str, Any]) -> tuple[str, str]:
        return ("drafter", f"EAGLE-3 draft: 1 decoder layer over base layers {meta['eagle3_layer_ids']}, "
                           f"{meta['eagle3_ttt_steps']} draft steps, draft vocabulary {meta['eagle3_draft_vocab_size']}")

    @classmethod
    def card(cls, meta: dict[str, Any], base: str) -> list[str]:
        return [
            f"# EAGLE-3 draft for `{base}`",
            "",
            f"One decoder layer trained with medusa-ray on the base model's own outputs. It reads the base's hidden "
            f"states at layers {meta['eagle3_layer_ids']} and drafts {meta['eagle3_ttt_steps']} tokens a step from "
            f"a vocabulary of the {meta['eagle3_draft_vocab_size']} tokens the base most often says; the base "
            "verifies them. Greedy outputs are unchanged; decoding gets faster when drafts are accepted.",
            "",
            "Files: `config.json` and `model.safetensors` in the layout of vLLM's `speculators` library "
            "(`speculators_model_type: eagle3`, with the `d2t`/`t2d` vocabulary maps), which vLLM loads directly.",
        ]

    @classmethod
    def card_keys(cls) -> tuple[str, ...]:
        return ("eagle3_ttt_steps", "eagle3_draft_vocab_size")

    # ---- eval --------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if config.get("speculators_model_type") != "eagle3":
            return None
        speculators = config.get("speculators_config") or {}
        proposal = speculators.get("proposal_methods") or [{}]
        return {"steps": int(proposal[0].get("speculative_tokens") or 3),
                "base": (speculators.get("verifier") or {}).get("name_or_path")}

    @classmethod
    def untrained(cls, export_dir: Path, base: str, out: Path) -> Path:
        """A draft of the export's shape (same layers and vocabulary maps) as training starts it."""
        from safetensors.torch import load_file
        from transformers import AutoConfig

        from medusa_ray.model.eagle3 import build_draft

        config = json.loads((export_dir / "config.json").read_text())
        tensors = load_file(str(export_dir / WEIGHTS_FILE))
        proposal = config["speculators_config"]["proposal_methods"][0]
        draft = build_draft(base, AutoConfig.from_pretrained(base), list(config["eagle_aux_hidden_state_layer_ids"]),
                            tensors.get("d2t"), tensors.get("t2d"), int(config["draft_vocab_size"]),
                            int(proposal["speculative_tokens"]))
        draft.to(next(t.dtype for t in tensors.values() if t.is_floating_point())).save_pretrained(out)
        return out


def _draft_from_checkpoint(weights: dict, meta: dict[str, Any], base_name: str):
    """The trained draft: rebuilt from the base like training built it, then the checkpoint's tensors loaded."""
    from transformers import AutoConfig

    from medusa_ray.model.eagle3 import FROM_BASE, build_draft

    weights = dict(weights)
    d2t, t2d = weights.pop("d2t", None), weights.pop("t2d", None)
    draft = build_draft(base_name, AutoConfig.from_pretrained(base_name), list(meta["eagle3_layer_ids"]), d2t, t2d,
                        int(meta["eagle3_draft_vocab_size"]), int(meta["eagle3_ttt_steps"]))
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    # What the base supplied (embeddings, projection, final norm) and the maps passed above are not missing.
    trained = [k for k in missing if not k.startswith(FROM_BASE) and k not in ("d2t", "t2d")]
    if unexpected or trained:
        raise UserError(f"checkpoint weights do not fit an EAGLE-3 draft for {base_name}: missing {trained[:3]}, "
                        f"unexpected {sorted(unexpected)[:3]}")
    return draft
