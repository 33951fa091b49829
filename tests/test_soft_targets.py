"""Medusa soft targets: the chunked loss against a mixture of the hard label and the base's own distribution."""

import pytest
import torch
from torch.nn import functional as F

from medusa_ray.model.heads import MedusaHeads
from medusa_ray.model.loss import linear_cross_entropy


def _reference(h, weight, y, soft_h, base_weight, w):
    """Written independently: full logits, ``F.cross_entropy`` with probability targets."""
    logits = (h @ weight.t()).float()
    p = torch.softmax((soft_h @ base_weight.t()).float(), dim=-1)
    target = (1 - w) * F.one_hot(y, logits.shape[-1]).float() + w * p
    return F.cross_entropy(logits, target, reduction="sum")


def _inputs(seed, n=37, hidden=16, vocab=50):
    torch.manual_seed(seed)
    h = torch.randn(n, hidden, requires_grad=True)
    weight = torch.randn(vocab, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    soft_h, base_weight = torch.randn(n, hidden), torch.randn(vocab, hidden)
    return h, weight, y, soft_h, base_weight


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("chunk", [1, 2, 7, 4096])
def test_chunked_soft_loss_and_grads_match_full_logits(w, chunk):
    h, weight, y, soft_h, base_weight = _inputs(chunk)
    loss, correct = linear_cross_entropy(h, weight, y, chunk, 3, soft_h=soft_h, soft_weight=base_weight,
                                         soft_target_weight=w)
    (0.7 * loss).backward()
    got = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    ref = _reference(h, weight, y, soft_h, base_weight, w)
    (0.7 * ref).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], weight.grad)
    # Top-k hits are counted against the hard label whatever w is.
    _, hard_correct = linear_cross_entropy(h.detach(), weight.detach(), y, chunk, 3)
    assert torch.equal(correct, hard_correct)


def test_zero_weight_is_bit_for_bit_the_hard_label_loss():
    h, weight, y, soft_h, base_weight = _inputs(1)
    hard, hard_correct = linear_cross_entropy(h, weight, y, 5, 2)
    hard.backward()
    hard_grads = h.grad.clone(), weight.grad.clone()
    h.grad = weight.grad = None
    soft, soft_correct = linear_cross_entropy(h, weight, y, 5, 2, soft_h=soft_h, soft_weight=base_weight,
                                              soft_target_weight=0.0)
    soft.backward()
    assert torch.equal(hard, soft) and torch.equal(hard_correct, soft_correct)
    assert torch.equal(hard_grads[0], h.grad) and torch.equal(hard_grads[1], weight.grad)


def test_soft_inputs_get_no_gradient_and_bf16_works():
    h, weight, y, soft_h, base_weight = _inputs(2)
    base_weight.requires_grad_()
    loss, _ = linear_cross_entropy(h, weight, y, 8, 1, soft_h=soft_h, soft_weight=base_weight,
                                   soft_target_weight=0.5)
    loss.backward()
    assert base_weight.grad is None
    # bf16 heads against a bf16 base: the loss is fp32 and close to the fp32 reference.
    hb, wb = h.detach().bfloat16().requires_grad_(), weight.detach().bfloat16().requires_grad_()
    loss_b, _ = linear_cross_entropy(hb, wb, y, 8, 1, soft_h=soft_h.bfloat16(), soft_weight=base_weight.bfloat16(),
                                     soft_target_weight=0.5)
    loss_b.backward()
    assert loss_b.dtype == torch.float32 and wb.grad.dtype == torch.bfloat16
    ref = _reference(hb.float(), wb.float(), y, soft_h.bfloat16().float(), base_weight.detach().bfloat16().float(),
                     0.5)
    torch.testing.assert_close(loss_b, ref, rtol=0.02, atol=0.5)


def _naive_heads_loss(heads, hidden, labels, base, w, decay):
    """Head k at t: target token t + k + 2, the base's distribution from its logits at t + k + 1."""
    total = 0.0
    vocab = base.shape[0]
    for k in range(heads.num_heads):
        shift = k + 2
        logits = heads.project(k, heads.hidden(k, hidden))[:, :-shift].reshape(-1, vocab)
        p = torch.softmax(hidden[:, k + 1 : -1] @ base.t(), dim=-1).reshape(-1, vocab)
        y = labels[:, shift:].reshape(-1)
        keep = y != -100
        target = (1 - w) * F.one_hot(y[keep], vocab).float() + w * p[keep]
        total = total + decay**k * F.cross_entropy(logits[keep], target)
    return total


@pytest.mark.parametrize("share", [False, True])
def test_heads_soft_loss_uses_the_base_output_one_position_before_the_target(share):
    torch.manual_seed(0)
    base = torch.randn(50, 16)
    heads = MedusaHeads(3, 1, base, share_lm_head=share)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hidden = torch.randn(3, 12, 16)
    labels = torch.randint(0, 50, (3, 12))
    labels[:, :4] = -100
    labels[1, 9:] = -100
    kwargs = {"soft_target_weight": 0.4} if share else {"soft_target_weight": 0.4, "base_lm_head": base}
    loss, stats = heads(hidden, labels=labels, head_decay=0.8, topk=2, chunk_tokens=3, **kwargs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in heads.named_parameters()}
    heads.zero_grad()
    ref = _naive_heads_loss(heads, hidden, labels, base, 0.4, 0.8)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in heads.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    for k in range(3):
        assert stats[k, 1].item() == (labels[:, k + 2 :] != -100).sum().item()
    # The soft targets are a reference, not state: the heads' weights are what they are without them.
    assert set(heads.state_dict()) == set(MedusaHeads(3, 1, base, share_lm_head=share).state_dict())


def test_unshared_heads_need_the_base_lm_head():
    heads = MedusaHeads(2, 1, torch.randn(50, 16))
    with pytest.raises(ValueError, match="base lm_head"):
        heads(torch.randn(1, 8, 16), labels=torch.randint(0, 50, (1, 8)), soft_target_weight=0.5)


def test_training_with_soft_targets_moves_heads_towards_the_base_distribution():
    torch.manual_seed(0)
    vocab, hidden_size = 64, 16
    base = 0.3 * torch.randn(vocab, hidden_size)
    hidden = torch.randn(4, 24, hidden_size)
    labels = torch.randint(0, vocab, (4, 24))  # hard labels unrelated to the base: w = 1 must ignore them

    def kl(heads):
        with torch.no_grad():
            total = 0.0
            for k in range(heads.num_heads):
                q = F.log_softmax(heads.project(k, heads.hidden(k, hidden))[:, : -(k + 2)], dim=-1)
                p = F.log_softmax(hidden[:, k + 1 : -1] @ base.t(), dim=-1)
                total += F.kl_div(q, p, log_target=True, reduction="batchmean").item()
            return total

    def train(w):
        torch.manual_seed(1)
        heads = MedusaHeads(2, 1, base)
        opt = torch.optim.Adam(heads.parameters(), lr=1e-2)
        for _ in range(60):
            opt.zero_grad()
            loss, _ = heads(hidden, labels=labels, chunk_tokens=16, soft_target_weight=w, base_lm_head=base)
            loss.backward()
            opt.step()
        return kl(heads)

    before = kl(MedusaHeads(2, 1, base))
    soft, hard = train(1.0), train(0.0)
    assert soft < 0.5 * before, (before, soft)
    assert soft < hard, (soft, hard)  # the hard labels alone pull the heads elsewhere


def test_the_drafter_trains_with_soft_targets_and_checkpoints_the_same_weights(random_tiny_model):
    """Through the Medusa drafter's build and loss on the tiny base: the base lm_head the soft targets read is a
    reference kept outside the heads (no copy), so the checkpoint's weights (``full_weights``: parameters and
    persistent buffers) have the same keys and shapes with and without soft targets."""
    from medusa_ray.config import build_config
    from medusa_ray.data.chat import load_tokenizer, tokenize_messages
    from medusa_ray.drafters.medusa import Medusa
    from medusa_ray.tiny import corpus
    from medusa_ray.train import worker
    from medusa_ray.train.data import collate

    class Engine(torch.nn.Module):  # what the drafter uses of a DeepSpeed engine
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    tok = load_tokenizer(str(random_tiny_model))
    examples = [tokenize_messages(tok, c, "chat", 128) for c in corpus.conversations(4, seed=3)]
    batch = collate([e.input_ids for e in examples], [e.labels for e in examples], tok.pad_token_id)
    weights, losses = {}, {}
    for share in (False, True):
        for w in (0.0, 0.5):
            cfg = build_config({}, [f"model={random_tiny_model}", "train.logits_chunk_tokens=64",
                                    f"train.soft_target_weight={w}", f"train.share_lm_head={share}"])
            base = worker.load_base(cfg, torch.device("cpu"), torch.float32)
            drafter = Medusa(cfg)
            heads = drafter.build(base, torch.device("cpu"), torch.float32)
            if w and not share:
                assert drafter.base_lm_head.data_ptr() == base.get_output_embeddings().weight.data_ptr()
            else:
                assert drafter.base_lm_head is None  # shared heads project through their own frozen copy
            features = drafter.features(worker.decoder_of(base), batch[0], batch[1])
            loss, stats, _ = drafter.loss(Engine(heads), features, batch, torch.device("cpu"))
            loss.backward()
            assert torch.isfinite(stats).all() and all(p.grad is not None for p in heads.parameters())
            losses[share, w] = loss.item()
            weights[share, w] = {k: v.shape for k, v in worker.full_weights(Engine(heads), drafter.trainable).items()}
        assert weights[share, 0.0] == weights[share, 0.5]
        assert losses[share, 0.5] != losses[share, 0.0]
