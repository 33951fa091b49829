"""Teacher-forced per-head accuracy on held-out distilled conversations (FasterDecoding's heads_accuracy).

Head k at position t guesses token t+k+2 from the base model's last hidden state at t; it scores top-i when
the true token is among its i best guesses. Only positions whose target is an assistant token count.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from medusa_ray.errors import UserError


def load_exported_heads(medusa_dir: str | Path):
    """``MedusaHeads`` with the weights of an export dir (its safetensors file, FasterDecoding keys)."""
    from safetensors.torch import load_file

    from medusa_ray.model.heads import MedusaHeads

    medusa_dir = Path(medusa_dir)
    config = json.loads((medusa_dir / "config.json").read_text())
    state = load_file(str(medusa_dir / "medusa_lm_head.safetensors"))  # the Medusa export's weights
    heads = MedusaHeads(config["medusa_num_heads"], config["medusa_num_layers"],
                        torch.zeros(config["vocab_size"], config["hidden_size"]))
    heads.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return heads.eval()


@torch.no_grad()
def head_accuracy(base_model: str, medusa_dir: str | Path, heldout: str, topk: int, max_rows: int,
                  max_length: int = 512) -> tuple[dict[str, list[float]], int]:
    """({"head k": [top-1, ..., top-topk]}, positions scored) over the first ``max_rows`` held-out rows."""
    from transformers import AutoModelForCausalLM

    from medusa_ray import parquet
    from medusa_ray.data import IGNORE_INDEX, load_tokenizer, tokenize_messages

    path = Path(heldout)
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise UserError(f"held-out data {heldout} has no Parquet files")
    rows = []
    for f in files:
        names = parquet.read_schema(f).names
        rows += parquet.read_table(f, columns=[c for c in ("messages", "mode") if c in names]).to_pylist()
        if len(rows) >= max_rows:
            break
    rows = rows[:max_rows]
    if not rows or "messages" not in rows[0]:
        raise UserError(f"held-out data {heldout} has no rows with a 'messages' column")

    tokenizer = load_tokenizer(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32).eval()
    decoder = model.get_decoder()
    heads = load_exported_heads(medusa_dir)
    hits = torch.zeros(heads.num_heads, topk, dtype=torch.long)
    counts = torch.zeros(heads.num_heads, dtype=torch.long)
    for row in rows:
        ex = tokenize_messages(tokenizer, [dict(m) for m in row["messages"]], row.get("mode") or "chat", max_length)
        ids = torch.tensor([ex.input_ids])
        labels = torch.tensor(ex.labels)
        hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[0]
        for k in range(heads.num_heads):
            shift = k + 2
            if len(ex.input_ids) <= shift:
                continue
            targets = labels[shift:]
            keep = targets != IGNORE_INDEX
            if not keep.any():
                continue
            logits = heads.project(k, heads.hidden(k, hidden[:-shift][keep]))
            guesses = logits.topk(topk, dim=-1).indices
            found = guesses == targets[keep].unsqueeze(-1)
            hits[k] += found.long().cumsum(-1).clamp(max=1).sum(0)
            counts[k] += int(keep.sum())
    accuracy = {f"head {k}": (hits[k].float() / max(int(counts[k]), 1)).tolist() for k in range(heads.num_heads)}
    return accuracy, int(counts[0])
