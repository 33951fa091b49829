"""The embedded tiny model: a real Hugging Face Llama directory built entirely on this machine.

``make_tiny_model(out_dir)`` trains a byte-level BPE tokenizer on locally generated text, writes a
Llama config whose head_dim is 64 (vLLM's CPU attention needs >= 32), and optionally pretrains the
weights for a few hundred steps on structured conversations so greedy outputs are predictable.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from medusa_ray.tiny import corpus

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _train_tokenizer(vocab_size: int, texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|end|>", pad_token="<|pad|>", model_max_length=1024
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def _pretrain(model, tokenizer, conversations, steps: int, seed: int, batch_size: int = 32,
              max_length: int = 256) -> float:
    """Causal-LM training on chat-rendered conversations; returns the final loss."""
    import torch
    from tqdm import tqdm

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    loss_value = float("nan")
    for _ in tqdm(range(steps), desc="pretraining tiny model", unit="step"):
        idx = torch.randint(len(texts), (batch_size,), generator=gen).tolist()
        batch = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                          max_length=max_length)
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_value = loss.item()
    model.eval()
    return loss_value


def make_tiny_model(
    out_dir: str | Path,
    pretrain_steps: int = 0,
    seed: int = 0,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    num_layers: int = 2,
    conversations: list[list[dict[str, str]]] | None = None,
    max_length: int = 256,
    max_shard_size: str | None = None,
) -> Path:
    """Write a loadable Llama model directory to ``out_dir`` (replaced atomically) and return its path.

    The tokenizer and the pretraining see ``conversations`` when given (``benchmarks/recipe.py`` passes real
    text), otherwise the generated corpus the demo's prompts come from; pretraining sees ``max_length`` tokens of
    each. ``max_shard_size`` (e.g. ``"200MB"``) splits the weights into several safetensors files, as large models
    come."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    torch.manual_seed(seed)
    if conversations is None:
        texts, conversations = corpus.plain_text(4000, seed), corpus.conversations(4096, seed + 1)
    else:
        texts = [m["content"] for c in conversations for m in c]
    tokenizer = _train_tokenizer(vocab_size, texts)
    head_dim = 64
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 3,
        num_hidden_layers=num_layers,
        num_attention_heads=hidden_size // head_dim,
        num_key_value_heads=hidden_size // head_dim,
        head_dim=head_dim,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    if pretrain_steps > 0:
        loss = _pretrain(model, tokenizer, conversations, pretrain_steps, seed, max_length=max_length)
        log.info("tiny model pretrained for %d steps, final loss %.3f", pretrain_steps, loss)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )

    # Build next to the destination and swap in, so a crash never leaves a half-written model.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True,
                              **({"max_shard_size": max_shard_size} if max_shard_size else {}))
        tokenizer.save_pretrained(tmp)
        (tmp / "medusa_ray_tiny.json").write_text(
            json.dumps({"pretrain_steps": pretrain_steps, "seed": seed}, indent=2)
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
