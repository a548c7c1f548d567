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


CROSS_ENTROPY_INTERPRETED = """
import torch
from megamoe.train import fused_cross_entropy as FC, loss as L
assert FC.triton is not None
FC.BLOCK = 16  # several column blocks at these vocabularies, the last one partial
out = {}
for vocab in (50, 10):  # 10 < BLOCK: lanes that never see a column
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(23, vocab, generator=gen) * 4
    logits[3, 7] = 60.0  # one dominant logit: the running max must rescale the sum
    labels = torch.randint(0, vocab, (23,), generator=gen)
    labels[[0, 5, 22]] = -100
    want_loss, want_grad = L._chunk_loss(logits, labels, True)
    got_loss, got_grad = FC.chunk_loss(logits, labels, True)
    eval_loss, no_grad = FC.chunk_loss(logits, labels, False)
    out[vocab] = [abs(got_loss.item() - want_loss.item()) / want_loss.item(),
                  (got_grad - want_grad).abs().max().item(), abs(eval_loss.item() - got_loss.item()),
                  bool((got_grad[[0, 5, 22]] == 0).all()), no_grad is None, got_grad.dtype == logits.dtype]
print(out)
"""


def test_the_cross_entropy_kernel_computes_the_torch_form():
    """The CUDA kernel of the loss chunk (`fused_cross_entropy`), run by Triton's interpreter on the
    CPU against `_chunk_loss` in fp32: the summed loss and the logits' gradient, masked rows zero,
    the loss alone in evaluation; several column blocks, and a vocabulary narrower than one."""
    from pip_cache import run_interpreted
    results = run_interpreted(CROSS_ENTROPY_INTERPRETED)
    assert set(results) == {50, 10}, results
    for rel_loss, grad_err, eval_err, masked_zero, eval_no_grad, same_dtype in results.values():
        assert rel_loss < 1e-6 and grad_err < 1e-6 and eval_err == 0, results
        assert masked_zero and eval_no_grad and same_dtype, results


SCALE_INTERPRETED = """
import torch
from megamoe.train import fused_cross_entropy as FC
FC.SCALE_BLOCK = 64  # several programs, the last one partial
gen = torch.Generator().manual_seed(0)
x = torch.randn(13, 29, generator=gen) * 1e3
s = torch.tensor(1 / 4093)  # not a power of two: the product rounds
got = FC.launch_scaled(x, s, torch.float32)
half = FC.launch_scaled(x.to(torch.bfloat16), s, torch.bfloat16)
want_half = (x.to(torch.bfloat16).float() * s)
print([torch.equal(got, x * s), got.shape == x.shape, half.dtype == torch.bfloat16,
       # the interpreter casts fp32 to bf16 by truncation (the GPU rounds to nearest): within one bf16 step
       bool(((half.float() - want_half).abs() <= want_half.abs() * 2 ** -7).all()),
       FC.launch_scaled(x[:0], s, torch.float32).shape == (0, 29)])
"""


def test_the_scale_kernel_is_the_fp32_product():
    """The loss backward's one-pass scaling (`fused_cross_entropy.scaled`'s CUDA kernel), run by
    Triton's interpreter on the CPU: the fp32 product bit for bit, over several programs."""
    from pip_cache import run_interpreted
    results = run_interpreted(SCALE_INTERPRETED)
    assert results == [True] * 5, results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton loss kernel runs on CUDA; CI has no GPU and "
                    "checks it under Triton's interpreter above (run on the GPU machine: docs/performance.md)")
def test_the_cross_entropy_kernel_equals_the_torch_form_on_cuda():
    """bf16 logits at a real vocabulary (50,304: 13 column blocks, the last partial): the kernel's
    loss and gradient against the torch form on the same GPU, launched directly and from compiled code."""
    from megamoe.train import fused_cross_entropy as FC
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(300, 50304, generator=g, device="cuda") * 3).to(torch.bfloat16)
    labels = torch.randint(0, 50304, (300,), generator=g, device="cuda")
    labels[:7] = -100
    want_loss, want_grad = L._chunk_loss(logits, labels, True)
    got_loss, got_grad = FC.chunk_loss(logits, labels, True)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-6)  # one bf16 rounding
    assert bool((got_grad[:7] == 0).all())
    # inside a compiled region the kernel runs as the custom op: the same kernel, the same numbers
    compiled_loss, compiled_grad = torch.compile(FC.chunk_loss, fullgraph=True)(logits, labels, True)
    assert torch.equal(compiled_grad, got_grad)
    torch.testing.assert_close(compiled_loss, got_loss, rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the scale kernel runs on CUDA; CI has no GPU and checks "
                    "it under Triton's interpreter above (run on the GPU machine: docs/performance.md)")
def test_the_scale_kernel_equals_the_torch_form_on_cuda():
    """bf16 in, bf16 and fp32 out: the kernel rounds the same fp32 product as the torch form."""
    from megamoe.train import fused_cross_entropy as FC
    x = torch.randn(1000, 777, device="cuda")
    s = torch.tensor(1 / 4093, device="cuda")
    for src, dtype in ((x.bfloat16(), torch.bfloat16), (x, torch.bfloat16), (x, torch.float32)):
        assert torch.equal(FC.scaled(src, s, dtype), (src.float() * s).to(dtype))

