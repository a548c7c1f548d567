"""The trainer's LM loss: the chunked linear + cross-entropy is the LM head followed by the
cross-entropy, in value and in the gradients of the hidden states and the head's weight."""

import pytest
import torch

from megamoe.train import loss as L


def head_and_batch(dtype, n=37, d=24, vocab=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, d, generator=g) * 0.3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (2, n), generator=g)
    labels[0, :5] = -100  # masked targets add nothing
    labels[1, -1] = -100
    return h, w, labels


@pytest.mark.parametrize("rows_per_chunk", [None, 5])  # one chunk; several, the last one partial
def test_linear_cross_entropy_is_the_head_then_the_cross_entropy(monkeypatch, rows_per_chunk):
    if rows_per_chunk:
        monkeypatch.setattr(L, "_chunks", lambda n, vocab: range(0, n, rows_per_chunk))
    h, w, labels = head_and_batch(torch.float64)
    want = L.cross_entropy(h @ w.t(), labels)
    want_h, want_w = torch.autograd.grad(want * 0.37, (h, w))  # the trainer divides by its target count
    got = L.linear_cross_entropy(h, labels, w)
    got_h, got_w = torch.autograd.grad(got * 0.37, (h, w))
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    # both compute the softmax in fp32 (the fp64 inputs are cast): fp32 rounding apart
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, want_w, rtol=1e-5, atol=1e-7)
    with torch.no_grad():  # evaluation: the loss alone, no gradient computed
        torch.testing.assert_close(L.linear_cross_entropy(h, labels, w), want.float(), rtol=1e-6, atol=0)


def test_linear_cross_entropy_in_bf16_rounds_like_the_unfused_path():
    h, w, labels = head_and_batch(torch.bfloat16, n=64, d=32, vocab=300)
    want = L.cross_entropy(h @ w.t(), labels)
    want_h, want_w = torch.autograd.grad(want / 100, (h, w))
    got = L.linear_cross_entropy(h, labels, w)
    got_h, got_w = torch.autograd.grad(got / 100, (h, w))
    assert got.dtype == torch.float32 and got_h.dtype == got_w.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_h, want_h, rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(got_w, want_w, rtol=2e-2, atol=1e-4)
