"""MedusaHeads and the chunked loss: layout, target alignment, and agreement with the plain full-logits loss."""

import pytest
import torch
from torch.nn import functional as F

from medusa_ray.model.heads import MedusaHeads
from medusa_ray.model.loss import linear_cross_entropy, reference_cross_entropy


def _heads(num_heads=3, num_layers=2, vocab=50, hidden=16, share=False, seed=0):
    torch.manual_seed(seed)
    heads = MedusaHeads(num_heads, num_layers, torch.randn(vocab, hidden), share_lm_head=share)
    with torch.no_grad():  # move off the zero init so every block matters
        for p in heads.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return heads


def test_state_dict_is_fasterdecoding_layout_with_independent_blocks():
    heads = MedusaHeads(3, 2, torch.randn(50, 16))
    expected = {f"{k}.{j}.linear.{w}" for k in range(3) for j in range(2) for w in ("weight", "bias")}
    expected |= {f"{k}.2.weight" for k in range(3)}
    assert set(heads.state_dict()) == expected
    assert heads.state_dict()["1.2.weight"].shape == (50, 16)
    # Each residual block owns its weights (FasterDecoding's [ResBlock] * L would share one module).
    assert heads[0][0].linear.weight.data_ptr() != heads[0][1].linear.weight.data_ptr()
    shared = MedusaHeads(3, 2, torch.randn(50, 16), share_lm_head=True)
    assert not any(k.endswith(".2.weight") for k in shared.state_dict())
    assert not any(p.shape == (50, 16) for p in shared.parameters())


def test_untrained_heads_reproduce_the_base_lm_head():
    lm_head = torch.randn(50, 16)
    heads = MedusaHeads(2, 1, lm_head)
    x = torch.randn(4, 16)
    for logits in heads(x):
        torch.testing.assert_close(logits, x @ lm_head.t())


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_cross_entropy_matches_full_logits(chunk):
    torch.manual_seed(chunk)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    loss, correct = linear_cross_entropy(h, w, y, chunk_tokens=chunk, topk=5)
    (0.3 * loss).backward()
    got = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_loss, ref_correct = reference_cross_entropy(h, w, y, topk=5)
    (0.3 * ref_loss).backward()
    torch.testing.assert_close(loss, ref_loss)
    assert torch.equal(correct, ref_correct)
    assert correct.tolist() == sorted(correct.tolist())  # top-i hits grow with i
    torch.testing.assert_close(got[0], h.grad)
    torch.testing.assert_close(got[1], w.grad)


def test_no_label_rows_give_zero_loss_and_zero_grads():
    h = torch.randn(0, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    loss, correct = linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.long), topk=2)
    loss.backward()
    assert loss.item() == 0.0 and correct.tolist() == [0.0, 0.0]
    assert torch.count_nonzero(w.grad) == 0


def _naive_medusa_loss(heads, hidden, labels, decay):
    """Written independently of the implementation: full logits per head, shift k + 2, ignore_index."""
    total = 0.0
    for k in range(heads.num_heads):
        logits = heads.project(k, heads.hidden(k, hidden))[:, : -(k + 2)]
        target = labels[:, k + 2 :]
        total = total + decay**k * F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return total


@pytest.mark.parametrize("share", [False, True])
def test_heads_loss_and_grads_match_naive_per_head_cross_entropy(share):
    heads = _heads(share=share)
    hidden = torch.randn(3, 12, 16)
    labels = torch.randint(0, 50, (3, 12))
    labels[:, :4] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    loss, stats = heads(hidden, labels=labels, head_decay=0.8, topk=3, chunk_tokens=5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in heads.named_parameters()}
    heads.zero_grad()
    ref = _naive_medusa_loss(heads, hidden, labels, 0.8)
    ref.backward()
    torch.testing.assert_close(loss, ref)
    for n, p in heads.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)
    assert stats.shape == (3, 2 + 3)
    for k in range(3):
        assert stats[k, 1].item() == (labels[:, k + 2 :] != -100).sum().item()


def test_head_k_at_position_t_predicts_token_t_plus_k_plus_2():
    heads = _heads(num_heads=3, num_layers=1)
    hidden = torch.randn(1, 10, 16)
    labels = torch.full((1, 10), -100)
    labels[0, 6] = 7  # the only labelled token
    _, stats = heads(hidden, labels=labels, topk=1)
    for k in range(3):
        # Head k sees that label from position 6 - (k + 2) only.
        logits = heads.project(k, heads.hidden(k, hidden[0, 6 - (k + 2)]))
        expected = F.cross_entropy(logits[None], torch.tensor([7]))
        assert stats[k, 1].item() == 1
        torch.testing.assert_close(stats[k, 0], expected)


def test_bf16_weight_gradient_accumulates_in_fp32():
    """On GPUs the heads run in bf16; summing the weight gradient over many chunks in bf16 loses precision
    chunk by chunk, so it must accumulate in fp32 (error near one bf16 rounding, not one per chunk)."""
    from medusa_ray.model.loss import linear_cross_entropy

    torch.manual_seed(0)
    n, hidden, vocab = 2048, 64, 512
    h = torch.randn(n, hidden).bfloat16().requires_grad_()
    w = (torch.randn(vocab, hidden) * 0.05).bfloat16().requires_grad_()
    y = torch.randint(0, vocab, (n,))
    loss, _ = linear_cross_entropy(h, w, y, chunk_tokens=16)
    loss.backward()
    assert w.grad.dtype == torch.bfloat16
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    torch.nn.functional.cross_entropy(h64 @ w64.t(), y, reduction="sum").backward()
    error = ((w.grad.double() - w64.grad).norm() / w64.grad.norm()).item()
    assert error < 0.005, error
