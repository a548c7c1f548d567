"""The fast dispatch paths compute the same function, and the same gradients, as the plain ones."""

import dataclasses

import pytest
import torch

from megamoe.moe.dispatch import Dispatcher, sort_keys
from megamoe.moe.experts import SwiGLUExperts
from megamoe.moe.router import Router, expert_counts, load_balancing_loss


def test_expert_counts_is_bincount():
    idx = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx, minlength=9))


def test_load_balancing_counts_per_sequence():
    """f_i counted per sequence: the loss equals its definition with bincount, sequence by sequence."""
    g = torch.Generator().manual_seed(1)
    B, S, E, k = 3, 20, 6, 2
    probs = torch.rand(B * S, E, generator=g).softmax(-1)
    top = probs.topk(k, dim=-1).indices
    want = torch.stack([E * (torch.bincount(top[b * S:(b + 1) * S].flatten(), minlength=E) / S
                             * probs[b * S:(b + 1) * S].mean(0)).sum() for b in range(B)]).mean()
    torch.testing.assert_close(load_balancing_loss(probs, top, E, num_sequences=B), want)


@pytest.mark.parametrize("num_experts", [8, 256, 257, 40000])
def test_narrow_sort_keys_keep_the_stable_order(num_experts):
    """Sorting the expert ids as uint8/int16/int32 gives the int64 ids' stable order, ties included."""
    idx = torch.randint(0, num_experts, (5000,), generator=torch.Generator().manual_seed(num_experts))
    idx[:50] = num_experts - 1  # the largest id, many times: the narrow type must hold it
    keys = sort_keys(idx, num_experts)
    assert keys.element_size() < idx.element_size()
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(idx, stable=True))


def test_dense_top_k_dispatch_matches_index_add_path():
    """Dropless token choice (gather + sum over k) equals the general gather/index_add_ path:
    output, and gradients of input, routing weights and expert weights, in float64."""
    T, d, E, k, F = 40, 12, 8, 3, 10
    g = torch.Generator().manual_seed(0)
    router = Router(d, E, k).double()
    experts = SwiGLUExperts(E, d, F).double()
    with torch.no_grad():
        for p in (*router.parameters(), *experts.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(T, d, generator=g, dtype=torch.float64)

    results = []
    for fast in (True, False):
        routing = router(x)
        assert routing.top_k == k
        if not fast:
            routing = dataclasses.replace(routing, top_k=0)
        y = Dispatcher(E).run(x, routing, experts)
        params = [x, router.weight, experts.w1, experts.w2]
        results.append([y, *torch.autograd.grad(y, params, dy)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_capacity_routing_is_not_dense():
    router = Router(8, 4, 2, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.normal_()
    routing = router(torch.randn(16, 8))
    assert routing.top_k == 0
    assert torch.equal(routing.expert_load, torch.bincount(routing.expert_idx, minlength=4))


def test_sum_rows_compiled_form_equals_eager_form(monkeypatch):
    """_sum_rows has a second formulation for torch.compile (k gathers added one by one)."""
    from megamoe.moe import dispatch
    g = torch.Generator().manual_seed(0)
    src = torch.randn(30, 5, generator=g, dtype=torch.float64)
    index = torch.randperm(30, generator=g).view(10, 3)
    weight = torch.rand(10, 3, generator=g, dtype=torch.float64)
    eager = [dispatch._sum_rows(src, index), dispatch._sum_rows(src, index, weight)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form = [dispatch._sum_rows(src, index), dispatch._sum_rows(src, index, weight)]
    for a, b in zip(eager, compiled_form):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


PERMUTE_INTERPRETED = """
import torch
from megamoe.moe import fused_permute as P
assert P.triton is not None
out = {}
for dtype in (torch.float32, torch.bfloat16):
    for d in (300, 2048):  # off the column block, and whole column blocks
        gen = torch.Generator().manual_seed(d)
        t, k = 13, 3  # 39 rows: off the row block
        src = torch.randn(t, d, generator=gen).to(dtype)
        token_of_row = torch.randint(0, t, (t * k,), generator=gen)  # repeats, as dispatch's
        rows = P.launch_gather(src, token_of_row)
        inverse = torch.randperm(t * k, generator=gen).view(t, k)
        summed = P.launch_sum(rows, inverse)
        acc = rows[inverse[:, 0]].float()
        for j in range(1, k):  # the compiled torch form's order: j = 0..k-1 in fp32
            acc = acc + rows[inverse[:, j]].float()
        # fp32 bit for bit; the interpreter casts fp32 to bf16 by truncation (the GPU rounds to
        # nearest): within one bf16 step of the fp32 sum
        exact = torch.equal(summed, acc) if dtype == torch.float32 else bool(
            ((summed.float() - acc).abs() <= acc.abs() * 2 ** -7).all())
        out[f"{dtype} {d}"] = [torch.equal(rows, src[token_of_row]), exact,
                               summed.dtype == dtype, P.launch_gather(src, token_of_row[:0]).shape == (0, d)]
print(out)
"""


def test_the_permutation_kernels_gather_and_sum_rows_as_the_torch_forms():
    """The CUDA kernels of dropless dispatch's permutations (`fused_permute`), run by Triton's
    interpreter on the CPU: the row gather equals torch's indexing, the k-row sum equals the
    compiled torch form of `_sum_rows` (fp32 sum in j's order; bit for bit in fp32, to the
    interpreter's bf16 cast in bf16), for sizes off the kernels' tiles."""
    from pip_cache import run_interpreted
    results = run_interpreted(PERMUTE_INTERPRETED)
    assert len(results) == 4 and all(all(v) for v in results.values()), results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton permutation kernels run on CUDA; CI has no "
                    "GPU and checks them under Triton's interpreter above (run on the GPU machine: docs/performance.md)")
def test_dispatch_with_the_permutation_kernels_equals_the_torch_forms_on_cuda(monkeypatch):
    """Dropless dispatch on CUDA, bf16, with the row-tiled kernels and with torch's indexing: the same
    output and gradients (the sums' order differs by bf16 roundings only)."""
    from megamoe.moe import fused_permute
    torch.manual_seed(0)
    T, d, E, k, F = 300, 256, 8, 3, 64
    router, experts = Router(d, E, k).cuda().bfloat16(), SwiGLUExperts(E, d, F).cuda().bfloat16()
    for p in (*router.parameters(), *experts.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    runs = []
    for kernels in (True, False):
        monkeypatch.setattr(fused_permute, "available", lambda t, on=kernels: on and t.is_cuda)
        y = Dispatcher(E).run(x, router(x), experts)
        runs.append([y, *torch.autograd.grad(y, (x, router.weight, experts.w1, experts.w2), dy)])
    for a, b in zip(*runs):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2
