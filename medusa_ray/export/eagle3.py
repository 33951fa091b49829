"""The EAGLE-3 export: the draft directory vLLM loads as ``speculative_config={"method": "eagle3", "model": DIR}``.

It is what ``speculators``' ``Eagle3DraftModel.save_pretrained`` writes (``config.json`` with
``speculators_model_type: eagle3``, the aux layer ids and the verifier; ``model.safetensors`` with the trained
layer, the draft vocabulary's projection and embeddings from the base, and the ``d2t``/``t2d`` maps), plus our
marker and model card. The checkpoint holds only what training changed (and the maps); the frozen parts come
from the base model here, as they did in training. TGI does not serve EAGLE drafts; vLLM (and SGLang) do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medusa_ray.errors import UserError

WEIGHTS_FILE = "model.safetensors"


def draft_from_checkpoint(weights: dict[str, torch.Tensor], meta: dict, base_name: str):
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


def write_files(tmp: Path, draft, dtype: torch.dtype) -> None:
    """The library's own layout; ``verifier_*`` (the base's final norm and head, used only to make training
    targets) is not part of it."""
    draft.to(dtype).save_pretrained(tmp)
    (tmp / "config.py").unlink(missing_ok=True)  # transformers copies the config class's source; vLLM needs none


def describe(meta: dict[str, Any]) -> str:
    return (f"EAGLE-3 draft: 1 decoder layer over base layers {meta['eagle3_layer_ids']}, "
            f"{meta['eagle3_ttt_steps']} draft steps, draft vocabulary {meta['eagle3_draft_vocab_size']}")
