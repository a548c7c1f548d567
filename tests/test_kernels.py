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
    """torch_sum_rows has a second formulation for torch.compile (k gathers added one by one)."""
    from megamoe.moe import fused_permute
    g = torch.Generator().manual_seed(0)
    src = torch.randn(30, 5, generator=g, dtype=torch.float64)
    index = torch.randperm(30, generator=g).view(10, 3)
    weight = torch.rand(10, 3, generator=g, dtype=torch.float64)
    eager = [fused_permute.torch_sum_rows(src, index), fused_permute.torch_sum_rows(src, index, weight)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form = [fused_permute.torch_sum_rows(src, index), fused_permute.torch_sum_rows(src, index, weight)]
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
        residual = torch.randn(t, d, generator=gen).to(dtype)
        with_res = P.launch_sum(rows, inverse, residual)  # the sum rounded, then the residual added in fp32
        want_res = residual.float() + summed.float()
        res_ok = torch.equal(with_res, want_res) if dtype == torch.float32 else bool(
            ((with_res.float() - want_res).abs() <= want_res.abs() * 2 ** -7).all())
        weight = torch.rand(t, k, generator=gen)  # fp32, as the router's: each row times it in fp32, then summed
        weighted = P.launch_sum(rows, inverse, residual, weight)
        acc_w = rows[inverse[:, 0]].float() * weight[:, :1]
        for j in range(1, k):
            acc_w = acc_w + rows[inverse[:, j]].float() * weight[:, j:j + 1]
        want_w = residual.float() + acc_w.to(dtype).float()
        weighted_ok = torch.equal(weighted, want_w) if dtype == torch.float32 else bool(
            ((weighted.float() - want_w).abs() <= (acc_w.abs() + want_w.abs()) * 2 ** -7).all())  # two roundings
        out[f"{dtype} {d}"] = [torch.equal(rows, src[token_of_row]), exact, res_ok, weighted_ok,
                               summed.dtype == dtype, P.launch_gather(src, token_of_row[:0]).shape == (0, d)]
print(out)
"""


def test_the_permutation_kernels_gather_and_sum_rows_as_the_torch_forms():
    """The CUDA kernels of dropless dispatch's permutations (`fused_permute`), run by Triton's
    interpreter on the CPU: the row gather equals torch's indexing, the k-row sum equals the
    compiled torch form of `_sum_rows` (fp32 sum in j's order; bit for bit in fp32, to the
    interpreter's bf16 cast in bf16), with a residual the residual plus that rounded sum, and weighted
    (the FP8 experts' combine) each row times its fp32 weight before the sum, for sizes off the kernels' tiles."""
    from pip_cache import run_interpreted
    results = run_interpreted(PERMUTE_INTERPRETED)
    assert len(results) == 4 and all(all(v) for v in results.values()), results


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton permutation kernels run on CUDA; CI has no "
                    "GPU and checks them under Triton's interpreter above (run on the GPU machine: docs/performance.md)")
def test_dispatch_with_the_permutation_kernels_equals_the_torch_forms_on_cuda(monkeypatch):
    """Dropless dispatch on CUDA, bf16, with the row-tiled kernels and with torch's indexing: the same
    output and gradients (the sums' order differs by bf16 roundings only)."""
    from megamoe.moe import fused_permute
    for a, b in zip(*dispatch_with_and_without(fused_permute, monkeypatch)):
        assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2


def dispatch_with_and_without(kernels, monkeypatch):
    """Dropless dispatch on CUDA in bf16 with `kernels.available` on, then off: [output, its gradients
    for x, the router's and the experts' weights] of each."""
    torch.manual_seed(0)
    T, d, E, k, F = 300, 256, 8, 3, 64
    router, experts = Router(d, E, k).cuda().bfloat16(), SwiGLUExperts(E, d, F).cuda().bfloat16()
    for p in (*router.parameters(), *experts.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(T, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(T, d, device="cuda", dtype=torch.bfloat16)
    runs = []
    for on in (True, False):
        monkeypatch.setattr(kernels, "available", lambda t, on=on: on and t.is_cuda)
        y = Dispatcher(E).run(x, router(x), experts)
        runs.append([y, *torch.autograd.grad(y, (x, router.weight, experts.w1, experts.w2), dy)])
    return runs


SORT_INTERPRETED = """
import torch
from megamoe.moe import fused_sort as S
assert S.triton is not None
out = {}
# (tokens, k, experts, ids): several blocks of S.TILE["block"] (N off a block and a tile's rows) so the
# earlier blocks' counts and the carry between a block's tiles both count; experts 64, 200 and 1000
# walk a block in 4, 16 and 64 tiles
cases = {
    "e8 k2 one expert most, three empty": (1500, 2, 8, lambda n, g: torch.where(
        torch.rand(n, generator=g) < 0.9, 3, torch.tensor([0, 1, 5, 7])[torch.randint(0, 4, (n,), generator=g)])),
    "e64 k8 every fifth empty": (700, 8, 64, lambda n, g: torch.randint(0, 52, (n,), generator=g) * 5 // 4),
    "e200 k1 the last expert most": (2500, 1, 200, lambda n, g: torch.where(
        torch.rand(n, generator=g) < 0.7, 199, torch.randint(0, 200, (n,), generator=g))),
    "e256 k8 uniform": (333, 8, 256, lambda n, g: torch.randint(0, 256, (n,), generator=g)),
    "e1000 k2 uniform": (1100, 2, 1000, lambda n, g: torch.randint(0, 1000, (n,), generator=g)),
    "e64 k2 inside one tile": (3, 2, 64, lambda n, g: torch.randint(0, 64, (n,), generator=g)),
    "no tokens": (0, 2, 64, lambda n, g: torch.randint(0, 64, (n,), generator=g)),
}
for name, (t, k, e, ids) in cases.items():
    expert_idx = ids(t * k, torch.Generator().manual_seed(len(name)))
    load = torch.bincount(expert_idx, minlength=e)
    order, inverse, token_of_row = S.launch_sort(expert_idx, load, k)
    want = torch.argsort(expert_idx, stable=True)
    want_inverse = torch.empty_like(want).scatter_(0, want, torch.arange(t * k))
    token_idx = torch.arange(t).repeat_interleave(k)
    out[name] = [torch.equal(order, want), torch.equal(inverse, want_inverse), torch.equal(token_of_row, token_idx[want]),
                 order.dtype == inverse.dtype == token_of_row.dtype == torch.int64, int((load == 0).sum())]
print(out)
"""


def test_the_counting_sort_kernels_give_the_stable_argsort_its_inverse_and_tokens():
    """`fused_sort`'s two kernels, run by Triton's interpreter on the CPU, give dispatch's three int64
    tensors exactly: argsort(stable=True) of the expert ids, its inverse and token_idx[order], for
    1 to 1000 experts, k 1 to 8, skewed loads with empty experts, several blocks, and no tokens."""
    from pip_cache import run_interpreted
    results = run_interpreted(SORT_INTERPRETED)
    assert len(results) == 7 and all(all(v[:4]) for v in results.values()), results
    assert results["e8 k2 one expert most, three empty"][4] == 3 and results["e64 k8 every fifth empty"][4] > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton sort kernels run on CUDA; CI checks them "
                    "under Triton's interpreter above")
def test_dispatch_with_the_counting_sort_equals_the_radix_sort_on_cuda(monkeypatch):
    """On CUDA the counting sort gives argsort's tensors bit for bit (eager and as the compiled op), so
    dropless dispatch's output and gradients are identical with and without it."""
    from megamoe.moe import fused_sort
    torch.manual_seed(0)
    for t, k, e in ((8192, 8, 64), (4099, 2, 200)):
        expert_idx = torch.randint(0, e, (t * k,), device="cuda")
        expert_idx[: t * k // 3] = e - 1
        load = torch.bincount(expert_idx, minlength=e)
        want = torch.argsort(expert_idx, stable=True)
        want_inverse = torch.empty_like(want).scatter_(0, want, torch.arange(t * k, device="cuda"))
        for sort in (fused_sort.sort_by_expert, torch.compile(fused_sort.sort_by_expert, fullgraph=True)):
            order, inverse, token_of_row = sort(expert_idx, load, k)
            assert torch.equal(order, want) and torch.equal(inverse, want_inverse)
            assert torch.equal(token_of_row, want // k)
    assert all(torch.equal(a, b) for a, b in zip(*dispatch_with_and_without(fused_sort, monkeypatch)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton sum kernel runs on CUDA; CI checks its residual "
                    "form under Triton's interpreter above and the model's residual paths on CPU (tests/test_model.py)")
@pytest.mark.parametrize("precision", ["model", "fp8"])
def test_the_sum_kernels_residual_add_is_the_blocks_on_cuda(monkeypatch, precision):
    """A MoE block in bf16 on CUDA (its experts' products in bf16, or FP8: the weighted sum), its residual
    added in the token sum's kernel and by the block: the same output and gradients bit for bit in eager
    mode. Compiled, inductor fuses the block's own `x + attn + y` in fp32 without rounding `h` to bf16
    first (and sums `h`'s gradients in its own order), so there the two agree to bf16's rounding, not bit
    for bit."""
    if precision == "fp8" and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("FP8 experts need sm_90 (the trainer refuses them before)")
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model import olmoe
    from megamoe.model.rope import rope_cos_sin
    torch.manual_seed(0)
    block = olmoe.Block(ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=4, max_seq_len=128),
                        MoEConfig(num_experts=8, top_k=2, ffn_hidden=256, expert_precision=precision),
                        0).cuda().bfloat16()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.05)
    h = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(128, 64, 10000.0, "cuda", torch.bfloat16)
    for compiled in (False, True):
        runs = []
        for fused in (True, False):
            monkeypatch.setattr(olmoe, "FUSED_RESIDUAL", fused)
            torch._dynamo.reset()
            fn = torch.compile(block) if compiled else block
            y, aux = fn(h, cos, sin)
            runs.append([y, *torch.autograd.grad((y.float().square().mean() + aux), (h, *block.parameters()))])
        if not compiled:
            assert all(torch.equal(a, b) for a, b in zip(*runs))
        for a, b in zip(*runs):
            assert float((a.float() - b.float()).norm() / b.float().norm()) < 1e-2, compiled


AVAILABILITY_TRACED = """
import torch
from megamoe.moe import experts, fp8, fp8_fused, fused_permute, fused_sort, fused_swiglu, grouped_gemm

def checks(x, w):
    xq, wq = x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn)
    return (fused_sort.available(x), fused_permute.available(x), fused_swiglu.available(x),
            grouped_gemm.rows_available(x, w), grouped_gemm.rows_available(x, w, True),
            grouped_gemm.wgrad_available(x, x), experts.grouped_mm_available(x), fp8.kernel_available(x),
            fp8_fused.available(x), grouped_gemm.scaled_rows_available(xq, wq))

x, w = torch.zeros(4, 256, dtype=torch.bfloat16), torch.zeros(2, 256, 256, dtype=torch.bfloat16)
print(torch.compile(checks, fullgraph=True, backend="eager")(x, w) == checks(x, w))
"""


def test_the_kernels_availability_checks_trace_without_a_graph_break():
    """Every check that picks a kernel path inside a compiled block traces as plain Python, with
    Triton importable: session 14's sort check read Triton's interpreter flag at each call, which
    torch.compile cannot trace, and split every compiled MoE block in two at dispatch."""
    from pip_cache import run_interpreted
    assert run_interpreted(AVAILABILITY_TRACED) is True


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the MoE block's CUDA kernels (sort, permutations, grouped "
                    "GEMMs, SwiGLU backward) are custom ops only on CUDA, where a break could come (run on the GPU "
                    "machine: docs/performance.md)")
@pytest.mark.parametrize("precision", ["model", "fp8"])
def test_a_moe_block_compiles_to_one_graph_on_cuda(precision):
    """The compiled MoE block as the trainer compiles it, on CUDA with every kernel on (bf16 experts, and
    FP8 experts: megamoe's FP8 product and `fp8_fused`'s kernels): one graph, no break (a break at dispatch
    split each block in two and left the GPU waiting for the host: session 14's c1 profile)."""
    from megamoe.config import ModelConfig, MoEConfig
    from megamoe.model import olmoe
    from megamoe.model.rope import rope_cos_sin
    block = olmoe.Block(ModelConfig(vocab_size=64, d_model=256, n_layers=1, n_heads=4, max_seq_len=128),
                        MoEConfig(num_experts=8, top_k=2, ffn_hidden=256, expert_precision=precision), 0).cuda().bfloat16()
    h = torch.randn(2, 128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(128, 64, 10000.0, "cuda", torch.bfloat16)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block)(h, cos, sin)
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
