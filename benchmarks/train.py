"""Training-step throughput and peak memory: medusa-ray's step vs a FasterDecoding ``train_legacy``-style step.

    .venv/bin/python benchmarks/train.py                      # CPU, vocab 1024 and 128256
    .venv/bin/python benchmarks/train.py --device cuda --hidden 1024 --batch 8 --max-length 1024

Both steps see the same token batches (tiny-corpus conversations, labels on assistant tokens only) and the
same base architecture (a Llama with the given hidden size, random weights, built in memory: nothing is
downloaded), train the same K heads with AdamW, and differ only in how the loss is computed:

* reference (FasterDecoding ``medusa_model_legacy`` + ``train_legacy``): base decoder under no_grad,
  every head's full [B, T, V] logits stacked, then a cross-entropy over all shifted positions
  (``ignore_index`` masks the prompt) and top-k accuracy. Nothing more: it never computes the base model's
  own logits. With ``share_lm_head`` the reference's heads project through the frozen base ``lm_head`` too,
  so each variant is compared with a reference that does the same work.
* medusa-ray: base decoder only, heads only on label-carrying positions, chunked cross-entropy with the
  gradients formed chunk by chunk (``medusa_ray.model.loss``), so no full logits ever exist.
* medusa-ray with soft targets (``train.soft_target_weight``): the same, plus the base ``lm_head``'s
  distribution for each target, also chunk by chunk.

Each case runs in a fresh process so peak memory is its own: on CPU the peak RSS during the timed steps
(VmHWM reset through /proc/self/clear_refs) minus the RSS before them; on GPU max_memory_allocated minus
what was allocated before the steps. Tokens/s counts non-padding input tokens: the median over the timed
steps, after ``--warmup`` untimed ones.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _batches(tokenizer_dir: str, n_batches: int, batch_size: int, max_length: int):
    from medusa_ray.data.chat import load_tokenizer, tokenize_messages
    from medusa_ray.tiny import corpus
    from medusa_ray.train.data import collate

    tok = load_tokenizer(tokenizer_dir)
    convs = corpus.conversations(n_batches * batch_size, seed=3, max_user_turns=4)
    out = []
    for i in range(n_batches):
        exs = [tokenize_messages(tok, c, "chat", max_length) for c in convs[i * batch_size : (i + 1) * batch_size]]
        out.append(collate([e.input_ids for e in exs], [e.labels for e in exs], tok.pad_token_id))
    return out


def _base(vocab: int, hidden: int, layers: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 3, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64), head_dim=64,
                      max_position_embeddings=4096, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.requires_grad_(False)
    return model.eval()


def _legacy_heads(lm_head, num_heads: int, num_layers: int, share: bool = False):
    """FasterDecoding's medusa_head: nn.Sequential(*([ResBlock(h)] * L), nn.Linear(h, V, bias=False)); with
    ``share`` every head's projection is one frozen copy of the base lm_head."""
    import torch
    from torch import nn

    class ResBlock(nn.Module):
        def __init__(self, hidden_size):
            super().__init__()
            self.linear = nn.Linear(hidden_size, hidden_size)
            nn.init.zeros_(self.linear.weight)
            self.act = nn.SiLU()

        def forward(self, x):
            return x + self.act(self.linear(x))

    vocab, hidden = lm_head.shape
    shared = nn.Linear(hidden, vocab, bias=False).requires_grad_(False) if share else None
    heads = nn.ModuleList(
        [nn.Sequential(*([ResBlock(hidden)] * num_layers), shared or nn.Linear(hidden, vocab, bias=False))
         for _ in range(num_heads)]
    )
    with torch.no_grad():
        for h in heads:
            h[-1].weight.copy_(lm_head)
    return heads


def _reference_step(base, heads, ids, mask, labels, decay: float, topk: int):
    """FasterDecoding train_legacy's compute_loss, on MedusaModel(output_orig=True)."""
    import torch
    from torch.nn import CrossEntropyLoss

    with torch.no_grad():
        outputs = base.model(input_ids=ids, attention_mask=mask)
    hidden_states = outputs[0].clone()
    logits = torch.stack([head(hidden_states) for head in heads], dim=0)
    loss = 0
    loss_fct = CrossEntropyLoss()
    for i in range(len(heads)):
        medusa_logits = logits[i, :, : -(2 + i)].contiguous().view(-1, logits.shape[-1])
        medusa_labels = labels[..., 2 + i :].contiguous().view(-1)
        loss_i = loss_fct(medusa_logits, medusa_labels)
        loss += decay**i * loss_i
        not_ignore = medusa_labels.ne(-100)
        with torch.no_grad():
            top = medusa_logits.topk(topk, dim=-1).indices[not_ignore]
            _ = top.eq(medusa_labels[not_ignore].unsqueeze(-1)).cumsum(-1).clamp(max=1).float().mean(0)
    loss.backward()
    return loss.detach()


def _ours_step(base, heads, ids, mask, labels, decay: float, topk: int, chunk: int, soft: float = 0.0):
    import torch

    with torch.no_grad():
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    extra = {"soft_target_weight": soft, "base_lm_head": base.get_output_embeddings().weight} if soft else {}
    loss, _ = heads(hidden, labels=labels, head_decay=decay, topk=topk, chunk_tokens=chunk, **extra)
    loss.backward()
    return loss.detach()


def _case(args, variant: str, vocab: int, batches, queue):
    import torch

    from medusa_ray.model.heads import MedusaHeads

    torch.set_num_threads(args.threads or torch.get_num_threads())
    device = torch.device(args.device)
    base = _base(vocab, args.hidden, args.layers).to(device)
    lm_head = base.get_output_embeddings().weight
    if variant.startswith("reference"):
        heads = _legacy_heads(lm_head, args.heads, args.layers_per_head, share=variant == "reference_shared")
        heads = heads.to(device)
    else:
        heads = MedusaHeads(args.heads, args.layers_per_head, lm_head, share_lm_head=variant == "share_lm_head").to(device)
    opt = torch.optim.AdamW([p for p in heads.parameters() if p.requires_grad], lr=1e-4)

    def step(b):
        ids, mask, labels = (x.to(device) for x in b)
        if variant.startswith("reference"):
            loss = _reference_step(base, heads, ids, mask, labels, 0.8, args.topk)
        else:
            loss = _ours_step(base, heads, ids, mask, labels, 0.8, args.topk, args.chunk,
                              soft=args.soft_target_weight if variant == "soft" else 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for b in batches[: args.warmup]:  # warm-up: allocator, optimizer state, first-call costs
        step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        import gc

        gc.collect()
        before = _rss_mb("VmRSS")
        if not _reset_peak():
            before = float("nan")
    times, tokens = [], []
    for b in batches[args.warmup:]:
        t0 = time.perf_counter()
        step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        tokens.append(int(b[1].sum()))
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mb("VmHWM")) - before
    tps = statistics.median(t / s for t, s in zip(tokens, times))
    queue.put({"variant": variant, "vocab": vocab, "tokens_per_s": tps, "peak_mb": peak})


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocabs", default="1024,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2, help="base decoder layers")
    p.add_argument("--heads", type=int, default=3)
    p.add_argument("--layers-per-head", type=int, default=1)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--topk", type=int, default=3)
    p.add_argument("--chunk", type=int, default=1024, help="train.logits_chunk_tokens")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--soft-target-weight", type=float, default=0.5, help="the soft-target variant's weight")
    args = p.parse_args(argv)

    from medusa_ray.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = str(make_tiny_model(Path(tmp) / "tok", pretrain_steps=0))  # only its tokenizer is used
        batches = _batches(tok_dir, args.warmup + args.steps, args.batch, args.max_length)
    n_tok = sum(int(b[1].sum()) for b in batches)
    n_lab = sum(int((b[2] != -100).sum()) for b in batches)
    print(f"data: {len(batches)} batches of {args.batch}, {n_tok} tokens, {n_lab / n_tok:.0%} carry labels; "
          f"hidden {args.hidden}, {args.heads} heads, device {args.device}")

    ctx = mp.get_context("spawn")
    rows = []
    for vocab in [int(v) for v in args.vocabs.split(",")]:
        for variant in ("reference", "ours", "soft", "reference_shared", "share_lm_head"):
            if variant in ("reference_shared", "share_lm_head") and vocab < 32000:
                continue
            q = ctx.Queue()
            proc = ctx.Process(target=_case, args=(args, variant, vocab, batches, q))
            proc.start()
            proc.join()
            if proc.exitcode != 0:
                rows.append({"variant": variant, "vocab": vocab, "tokens_per_s": float("nan"), "peak_mb": float("nan")})
                print(f"  {variant} @ vocab {vocab}: failed (exit {proc.exitcode})", file=sys.stderr)
                continue
            rows.append(q.get())
            print(f"  done: {variant} @ vocab {vocab}", file=sys.stderr)

    names = {"reference": "reference (train_legacy)", "ours": "medusa-ray",
             "soft": f"medusa-ray, soft targets {args.soft_target_weight:g}",
             "reference_shared": "reference, shared lm_head", "share_lm_head": "medusa-ray, share_lm_head"}
    baseline = {"ours": "reference", "soft": "reference", "reference": "reference", "share_lm_head": "reference_shared",
                "reference_shared": "reference_shared"}
    print(f"\n{'vocab':>7}  {'step':<26} {'tokens/s':>10} {'peak MiB':>10} {'speed-up':>9} {'memory':>7}")
    for r in rows:
        ref = next(x for x in rows if x["vocab"] == r["vocab"] and x["variant"] == baseline[r["variant"]])
        speed = r["tokens_per_s"] / ref["tokens_per_s"]
        mem = r["peak_mb"] / ref["peak_mb"]
        print(f"{r['vocab']:>7}  {names[r['variant']]:<26} {r['tokens_per_s']:>10.0f} {r['peak_mb']:>10.0f} "
              f"{speed:>8.2f}x {mem:>6.2f}x")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
