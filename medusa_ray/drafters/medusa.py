"""Medusa heads: K residual heads on the base's last hidden state, head k guessing token t+k+2.

The export is one directory for both servers:

* TGI (``text_generation_server``) treats a model dir as Medusa when ``config.json`` has ``medusa_num_heads``;
  it loads the base from ``base_model_name_or_path``, reads ``medusa_num_layers``, and takes
  ``{k}.{j}.linear.weight|bias`` and ``{k}.{L}.weight`` from ``medusa_lm_head.safetensors``. Its
  ``SpeculativeHead.load`` only builds Medusa heads when ``config.json`` has **no** ``architectures`` key, so we
  never write one.
* vLLM reads ``model_type: "medusa"`` into its ``MedusaConfig``, maps ``medusa_num_heads``/``medusa_num_layers``,
  needs ``hidden_size``, ``vocab_size`` and ``medusa_fc_bias: true`` (without it the block biases are dropped
  silently), and remaps the same keys from every ``*.safetensors`` file in the directory. vLLM 0.32 drafts the
  heads' top-1 chain (no tree, no typical acceptance).

``share_lm_head`` heads were trained projecting through the frozen base ``lm_head``; both servers want one vocab
projection per head, so the export writes a copy of the base ``lm_head`` as each head's ``{k}.{L}.weight``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import Field

from medusa_ray.config import DrafterKeys
from medusa_ray.drafters import Drafter, register
from medusa_ray.errors import UserError

log = logging.getLogger(__name__)

WEIGHTS_FILE = "medusa_lm_head.safetensors"
_HEAD_KEY = re.compile(r"^(\d+)\.(\d+)\.(linear\.weight|linear\.bias|weight)$")


class MedusaKeys(DrafterKeys):
    medusa_num_heads: int = Field(3, ge=1)
    """K: number of Medusa heads; head k predicts token t+k+2."""
    medusa_num_layers: int = Field(1, ge=1)
    """L: residual blocks per head."""
    share_lm_head: bool = False
    """Project every head through the frozen base ``lm_head`` instead of a trainable copy each."""
    topk: int = Field(3, ge=1)
    """Report top-1 .. top-k accuracy per head."""
    soft_target_weight: float = Field(0.0, ge=0.0, le=1.0)
    """Soft targets: head k's target is ``(1 - w) * the distilled token + w * the base's own distribution`` for that
    token (its ``lm_head`` on its hidden state one position earlier, fp32, chunked like the loss). Off (0) by
    default: on ``benchmarks/recipe.py`` it did not raise vLLM's acceptance (1.761 at 0.5, 1.770 at 0, 20 epochs); a
    128k-vocabulary step's memory rises by a quarter."""


def medusa_metrics(stats, head_decay: float, topk: int) -> dict[str, float]:
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


@register
class Medusa(Drafter):
    method = "medusa"
    title = "Medusa heads"
    position = "head"
    keys = MedusaKeys
    meta_keys = ("medusa_num_heads", "medusa_num_layers", "share_lm_head")
    weights_file = WEIGHTS_FILE
    serves_with_tgi = True

    def __init__(self, cfg, prepared=None):
        super().__init__(cfg, prepared)
        self.steps, self.width = cfg.train.medusa_num_heads, 2 + cfg.train.topk
        self.base_lm_head = None  # the frozen base lm_head, for soft targets (``build``)

    # ---- config -------------------------------------------------------------------------------------------
    @classmethod
    def num_positions(cls, train_cfg) -> int:
        return train_cfg.medusa_num_heads

    @classmethod
    def shape(cls, train_cfg, hidden_size: int, vocab_size: int) -> dict[str, Any]:
        return {"method": cls.method, "medusa_num_heads": train_cfg.medusa_num_heads,
                "medusa_num_layers": train_cfg.medusa_num_layers, "share_lm_head": train_cfg.share_lm_head,
                "hidden_size": hidden_size, "vocab_size": vocab_size}

    @classmethod
    def describe_training(cls, train_cfg, prepared) -> str:
        return f"{train_cfg.medusa_num_heads} Medusa heads"

    @classmethod
    def summary_columns(cls, train_cfg) -> list[str]:
        return [f"top{i}" for i in range(1, train_cfg.topk + 1)]

    # ---- training ----------------------------------------------------------------------------------------
    def name(self, k: int) -> str:
        return f"medusa{k}"

    def build(self, base, device, dtype):
        import torch

        from medusa_ray.model.base import output_weight
        from medusa_ray.model.heads import MedusaHeads

        t = self.cfg.train
        torch.manual_seed(t.seed)
        lm_head = output_weight(base, self.cfg.model)
        heads = MedusaHeads(t.medusa_num_heads, t.medusa_num_layers, lm_head, share_lm_head=t.share_lm_head)
        # Soft targets project through the base lm_head as it is: a frozen reference (the base's own parameter
        # where this process holds it, no copy), never a parameter or buffer of the heads, so the checkpoint's
        # weights and the export are the same with or without them. Shared heads already hold it.
        self.base_lm_head = None
        if t.soft_target_weight > 0 and not t.share_lm_head:
            self.base_lm_head = lm_head.detach().to(device)
        return heads.to(device=device, dtype=dtype)

    def loss(self, engine, features, batch, device):
        """(loss, stats [K, 2 + topk]: loss sum, positions, hits@1..topk; attention mask)."""
        _, mask, labels = (x.to(device) for x in batch)
        dtype = next(engine.module.parameters()).dtype
        hidden = features["last"].to(device=device, dtype=dtype)
        t = self.cfg.train
        soft = {}
        if t.soft_target_weight > 0:
            soft = {"soft_target_weight": t.soft_target_weight, "base_lm_head": self.base_lm_head}
        loss, stats = engine(hidden, labels=labels, head_decay=t.head_decay, topk=t.topk,
                             chunk_tokens=t.logits_chunk_tokens, **soft)
        return loss, stats, mask

    def metrics(self, stats) -> dict[str, float]:
        return medusa_metrics(stats, self.cfg.train.head_decay, self.cfg.train.topk)

    # chain: vLLM drafts the heads' top-1 chain; head errors are taken as independent (the default).

    def meta(self, module) -> dict[str, Any]:
        return {"medusa_num_heads": module.num_heads, "medusa_num_layers": module.num_layers,
                "share_lm_head": module.share_lm_head}

    # ---- export ------------------------------------------------------------------------------------------
    @classmethod
    def check_weights(cls, weights: dict, meta: dict[str, Any], where) -> None:
        """The checkpoint's tensors are exactly the heads ``meta`` describes: same count, layers and shapes."""
        heads, layers, hidden, vocab = (int(meta[k]) for k in ("medusa_num_heads", "medusa_num_layers",
                                                               "hidden_size", "vocab_size"))
        expected: dict[str, tuple[int, ...]] = {}
        for k in range(heads):
            for j in range(layers):
                expected[f"{k}.{j}.linear.weight"] = (hidden, hidden)
                expected[f"{k}.{j}.linear.bias"] = (hidden,)
            if not meta["share_lm_head"]:
                expected[f"{k}.{layers}.weight"] = (vocab, hidden)
        unexpected = sorted(set(weights) - set(expected))
        missing = sorted(set(expected) - set(weights))
        if unexpected or missing:
            found_heads = {int(m.group(1)) for key in weights if (m := _HEAD_KEY.match(key))}
            raise UserError(
                f"{where}: weights do not match the checkpoint meta ({heads} heads x {layers} layers): "
                f"missing {missing[:3]}, unexpected {unexpected[:3]} (weights hold {len(found_heads)} heads)"
            )
        for key, shape in expected.items():
            if tuple(weights[key].shape) != shape:
                raise UserError(f"{where}: {key} has shape {tuple(weights[key].shape)}, expected {shape}")

    @classmethod
    def export_files(cls, weights: dict, meta: dict[str, Any], base_name: str, dtype, published_base: str):
        tensors = head_tensors(weights, meta, base_name, dtype)
        config = medusa_config(meta, published_base)

        def write(tmp: Path) -> None:
            """The heads, the ``config.json`` both servers read, the base tokenizer (TGI loads it here)."""
            from safetensors.torch import save_file
            from transformers import AutoTokenizer

            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            try:
                AutoTokenizer.from_pretrained(base_name).save_pretrained(tmp)
            except Exception as exc:  # noqa: BLE001 - a base without a tokenizer still gives usable heads
                log.warning("base model %s: tokenizer not copied (%s)", base_name, exc)

        return write

    @classmethod
    def describe(cls, meta: dict[str, Any]) -> tuple[str, str]:
        return ("heads x layers", f"{meta['medusa_num_heads']} x {meta['medusa_num_layers']}"
                                  f"{' (shared lm_head)' if meta['share_lm_head'] else ''}")

    @classmethod
    def card(cls, meta: dict[str, Any], base: str) -> list[str]:
        lines = [
            f"# Medusa heads for `{base}`",
            "",
            f"{meta['medusa_num_heads']} Medusa heads ({meta['medusa_num_layers']} residual block(s) each) trained "
            "with medusa-ray on the base model's own outputs. Head k predicts the token k+2 positions ahead; the "
            "base model's `lm_head` still predicts the next one. Greedy outputs are unchanged; decoding gets "
            "faster when drafts are accepted.",
            "",
            "Files: `medusa_lm_head.safetensors` (FasterDecoding/TGI layout: `{k}.{j}.linear.weight|bias`, "
            "`{k}.{L}.weight`), `config.json` (read by both vLLM and TGI), the base model's tokenizer.",
        ]
        if meta.get("share_lm_head"):
            lines += ["", "These heads were trained with `share_lm_head`: each head projects through the frozen "
                      "base `lm_head`. Both servers expect one vocab projection per head, so `{k}.{L}.weight` holds "
                      "a copy of the base `lm_head` for every head."]
        return lines

    @classmethod
    def card_keys(cls) -> tuple[str, ...]:
        return ("medusa_num_heads", "medusa_num_layers", "share_lm_head")

    # ---- eval --------------------------------------------------------------------------------------------
    @classmethod
    def detect(cls, config: dict[str, Any]) -> dict[str, Any] | None:
        if "medusa_num_heads" not in config:
            return None
        return {"steps": int(config["medusa_num_heads"]), "base": config.get("base_model_name_or_path")}

    @classmethod
    def max_speculative_tokens(cls, steps: int) -> int | None:
        return steps  # one token per head

    @classmethod
    def untrained(cls, export_dir: Path, base: str, out: Path) -> Path:
        """Heads of the export's shape as training starts them (each one a copy of the base lm_head)."""
        from safetensors.torch import load_file, save_file

        from medusa_ray.model.base import base_lm_head
        from medusa_ray.model.heads import MedusaHeads

        config = json.loads((export_dir / "config.json").read_text())
        trained = load_file(export_dir / WEIGHTS_FILE)
        heads = MedusaHeads(config["medusa_num_heads"], config["medusa_num_layers"], base_lm_head(base))
        dtype = next(iter(trained.values())).dtype
        tensors = {k: v.to(dtype).contiguous() for k, v in heads.state_dict().items()}
        if tensors.keys() != trained.keys():
            raise UserError(f"{export_dir}: heads are not in the layout untrained heads are built in")
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / WEIGHTS_FILE))
        (out / "config.json").write_text(json.dumps(config, indent=2))
        return out

    @classmethod
    def heldout_accuracy(cls, base: str, draft_dir: Path, heldout: str, cfg) -> tuple[dict, int] | None:
        """Teacher-forced top-k per head on held-out distilled rows."""
        from medusa_ray.model.accuracy import head_accuracy

        return head_accuracy(base, draft_dir, heldout, cfg.train.topk, cfg.eval.num_prompts, cfg.train.max_length)


def head_tensors(weights: dict, meta: dict[str, Any], base_name: str, dtype) -> dict:
    """FasterDecoding/TGI tensors; ``share_lm_head`` heads get a copy of the base lm_head each."""
    tensors = dict(weights)
    if meta["share_lm_head"]:
        from medusa_ray.model.base import base_lm_head

        lm_head = base_lm_head(base_name)
        for k in range(int(meta["medusa_num_heads"])):
            tensors[f"{k}.{int(meta['medusa_num_layers'])}.weight"] = lm_head
    # safetensors refuses shared storage; each tensor gets its own contiguous copy.
    return {k: v.to(dtype).contiguous().clone() for k, v in sorted(tensors.items())}


def medusa_config(meta: dict[str, Any], base_name: str) -> dict[str, Any]:
    """``config.json`` both servers read. Deliberately no ``architectures`` (see module docstring) and no other
    key with "num" in its name (vLLM renames any such key to ``num_heads``/``num_hidden_layers``)."""
    return {
        "model_type": "medusa",
        "medusa_num_heads": int(meta["medusa_num_heads"]),
        "medusa_num_layers": int(meta["medusa_num_layers"]),
        "hidden_size": int(meta["hidden_size"]),
        "vocab_size": int(meta["vocab_size"]),
        "medusa_fc_bias": True,
        "base_model_name_or_path": base_name,
        "version": "2",
    }
