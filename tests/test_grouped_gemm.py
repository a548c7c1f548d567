"""The experts' grouped GEMM kernels (megamoe/moe/grouped_gemm.py): each equals the per-expert
product, on CPU through torch's grouped GEMM and the Triton kernels under Triton's interpreter."""

import pytest
import torch

from megamoe.moe import experts, grouped_gemm as G


def per_expert(counts):
    ends = torch.cumsum(torch.tensor(counts), 0).tolist()
    return list(zip([0] + ends[:-1], ends))


def rows_ref(a, b, counts, trans_b=False):
    return torch.cat([a[s:e] @ (b[i].T if trans_b else b[i]) for i, (s, e) in enumerate(per_expert(counts))])


def wgrad_ref(a, b, counts):
    return torch.stack([a[s:e].T @ b[s:e] for s, e in per_expert(counts)])


# Every expert's rows: empty experts (first, inner, last), groups shorter than a tile, longer than
# several, and ones ending inside a tile, so that a tile's rows run into the next expert's.
COUNTS = [[0, 5, 0, 37, 20, 1, 0], [0, 0, 0, 0, 0, 0, 50], [16, 16, 16, 16, 16, 16, 16],
          [70, 0, 33, 3, 100, 32, 0]]

def interpreted_header(seed: int) -> str:
    """The interpreter scripts' start: the kernels' module, a generator, 7 experts of [64, 128] products."""
    return f"""
import torch
from megamoe.moe import grouped_gemm as G
assert G.triton is not None
gen = torch.Generator().manual_seed({seed})
out = []
E, K, N = 7, 64, 128
"""


INTERPRETED = interpreted_header(0) + """
for counts in %r:
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    R = int(offs[-1])
    # the rows: of R // 2 tokens, each in several rows (read in place by the kernels' gathering loads too)
    index = torch.randint(0, R // 2, (R,), generator=gen)
    a_src, dy_src = torch.randn(R // 2, K, generator=gen), torch.randn(R // 2, N, generator=gen)
    a, dy = a_src[index], dy_src[index]
    b, bt = torch.randn(E, K, N, generator=gen), torch.randn(E, N, K, generator=gen)
    # small tiles (16 or 32 rows, 32 to 128 columns; the gradient's output whole or in two slices)
    G.WGRAD_FLAT = False  # the uncut weight gradient's nested loop first
    got = [G.launch_rows_mm(a, b, offs, config=(16, 32, 16, 4, 2)),
           G.launch_rows_mm(a, bt, offs, trans_b=True, config=(32, 64, 16, 4, 2)),
           G.launch_weight_grad_mm(a, dy, offs, config=(32, 64, 16, 4, 2, 2)),
           G.launch_weight_grad_mm(a, dy, offs, config=(16, 128, 32, 4, 2, 1)),
           # experts longer than 32 rows cut into pieces of 16, longer than 20 into pieces of 32
           G.launch_weight_grad_mm(a, dy, offs, config=(32, 64, 16, 4, 2, 2), cut=(32, 16)),
           G.launch_weight_grad_mm(a, dy, offs, config=(16, 128, 32, 4, 2, 1), cut=(20, 32)),
           # one tile an expert: 7 items over 4 programs, a last round of 3 (dealt forwards)
           G.launch_weight_grad_mm(a, dy, offs, config=(64, 128, 16, 4, 2, 1), cut=(0, 0))]
    G.LONGEST_FIRST = False  # expert after expert
    got.append(G.launch_weight_grad_mm(a, dy, offs, config=(32, 64, 16, 4, 2, 2), cut=(0, 0)))
    G.LONGEST_FIRST = True
    G.WGRAD_FLAT = True  # one loop over each program's k-steps: several tiles a program, one a program
    got.append(G.launch_weight_grad_mm(a, dy, offs, config=(32, 64, 16, 4, 2, 2), cut=(0, 0)))
    got.append(G.launch_weight_grad_mm(a, dy, offs, config=(64, 128, 16, 4, 2, 1), cut=(0, 0)))
    G.LONGEST_FIRST = False
    got.append(G.launch_weight_grad_mm(a, dy, offs, config=(16, 128, 32, 4, 2, 1), cut=(0, 0)))
    G.LONGEST_FIRST = True
    # the rows read through the index: the weight gradient's flat loop, its nested loop and its cut experts
    got.append(G.launch_weight_grad_mm(a_src, dy, offs, config=(32, 64, 16, 4, 2, 2), cut=(0, 0), a_index=index))
    G.WGRAD_FLAT = False
    got.append(G.launch_weight_grad_mm(a, dy_src, offs, config=(16, 128, 32, 4, 2, 1), cut=(0, 0), b_index=index))
    got.append(G.launch_weight_grad_mm(a_src, dy_src, offs, config=(32, 64, 16, 4, 2, 2), cut=(32, 16),
                                       a_index=index, b_index=index))
    rows = [G.launch_rows_mm(a_src, b, offs, config=(16, 32, 16, 4, 2), a_index=index),
            G.launch_rows_mm(a_src, bt, offs, trans_b=True, config=(32, 64, 16, 4, 2), a_index=index)]
    G.ROWS_TMA_STORE = False  # masked stores from registers
    rows.append(G.launch_rows_mm(a, b, offs, config=(16, 32, 16, 4, 2)))
    G.ROWS_TMA_STORE = True
    out.append([t.tolist() for t in (a, dy, b, bt, *rows, *got)])
print(out)
"""


def test_the_triton_kernels_compute_each_experts_product():
    """Under Triton's interpreter (fp32): the row-grouped product (weight read as stored and as its
    transpose; its tiles stored by TMA through ragged descriptors, or masked) and the weight gradient
    equal the per-expert loop; an empty expert's gradient is 0,
    no tile writes rows of a neighbouring expert (masked stores) and no expert's gradient sums a
    neighbour's rows (ragged loads read zeros past each expert's end). The weight gradient also with
    long experts cut into pieces and the pieces taken largest first from a counter: past 32 rows in
    pieces of 16 (100 rows in 7, the last short; 33 in 3; 32 uncut) and past 20 in pieces of 32 (32
    rows: one piece through the second pass), beside uncut and empty experts, each piece summed once;
    and uncut, the tiles of the longest experts first, dealt back and forth over the programs (a last
    partial round forwards), or expert after expert; and the uncut schedule as one flat loop over each
    program's k-steps (`WGRAD_FLAT`: an empty expert's tile is one step of zeros, stored). Every product
    also with its token rows read in place through an index with repeats (`a_index`, `b_index`: the
    experts' gathered operands) in place of a gathered copy."""
    from pip_cache import run_interpreted
    runs = run_interpreted(INTERPRETED % (COUNTS,))
    for counts, run in zip(COUNTS, runs):
        a, dy, b, bt, rows_gathered, rows_t_gathered, rows_masked, rows, rows_t, *wgrads = map(torch.tensor, run)
        assert len(wgrads) == 12
        for got, t in ((rows, False), (rows_t, True), (rows_masked, False), (rows_gathered, False),
                       (rows_t_gathered, True)):
            torch.testing.assert_close(got, rows_ref(a, bt if t else b, counts, trans_b=t), rtol=1e-5, atol=1e-4)
        want = wgrad_ref(a, dy, counts)
        for wgrad in wgrads:
            torch.testing.assert_close(wgrad, want, rtol=1e-5, atol=1e-4)
            assert all(wgrad[i].abs().max() == 0 for i, c in enumerate(counts) if c == 0)


SCALED_INTERPRETED = interpreted_header(3) + """
for counts in %r:
    offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
    R = int(offs[-1])
    index = torch.randint(0, R // 2 + 1, (R,), generator=gen)
    a_src = (4 * torch.randn(R // 2 + 1, K, generator=gen)).to(torch.float8_e4m3fn)
    b = (4 * torch.randn(E, N, K, generator=gen)).to(torch.float8_e4m3fn)  # [E, N, K]: K-major
    a_scale = torch.exp2(torch.randint(-8, 8, (R // 2 + 1,), generator=gen).float())
    b_scale = torch.exp2(torch.randint(-8, 8, (E, N), generator=gen).float())
    a = a_src[index]
    got = [G.launch_scaled_rows_mm(a, a_scale[index], b, b_scale, offs, out_dtype=torch.float32, config=(16, 32, 32, 4, 2)),
           G.launch_scaled_rows_mm(a_src, a_scale, b, b_scale, offs, out_dtype=torch.float32, config=(32, 64, 32, 4, 2),
                                   a_index=index),
           G.launch_scaled_rows_mm(a, a_scale[index], b, b_scale, offs, config=(16, 64, 64, 4, 2))]
    out.append([t.float().tolist() for t in (a.float(), a_scale[index], b.float(), b_scale, *got)])
print(out)
"""


def test_the_fp8_kernel_computes_each_experts_scaled_product():
    """Under Triton's interpreter: the e4m3 row-grouped product (`launch_scaled_rows_mm`, the FP8 experts'
    forward and input-gradient products) equals the per-expert product of the dequantized operands,
    (a[r] · a_scale[r]) @ (b[e] · b_scale[e])ᵀ, for experts empty, short and past a tile, with the rows
    read from a copy or through an index (each row's scale through the same index), out in fp32 and in
    bf16; no tile writes another expert's rows."""
    from pip_cache import run_interpreted
    runs = run_interpreted(SCALED_INTERPRETED % (COUNTS,))
    for counts, run in zip(COUNTS, runs):
        a, a_scale, b, b_scale, copy, gathered, bf16 = map(torch.tensor, run)
        want = rows_ref(a * a_scale[:, None], b * b_scale[:, :, None], counts, trans_b=True)
        torch.testing.assert_close(copy, want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(gathered, want, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(bf16, want.bfloat16().float(), rtol=8e-3, atol=1e-2)


SM90 = """
import re
import triton
from triton.backends.compiler import GPUTarget
from megamoe.moe import grouped_gemm as G

def compiled(kernel, pointers, scalars, consts, warps, stages):
    names = list(kernel.arg_names)
    signature = {**pointers, **scalars, **{n: "constexpr" for n in consts}}
    # a launch specializes 16-byte-aligned pointers: so does this compile
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": stages})

def ttgir(kernel, pointers, scalars, consts, warps, stages):
    text = compiled(kernel, pointers, scalars, consts, warps, stages).asm["ttgir"]
    allocs = " ".join(line for line in text.splitlines() if "local_alloc" in line)
    return [text.count("ttg.async_copy_global_to_local"), text.count("async_tma_copy_global_to_local"),
            "pendings = 1" in text, [int(n) for n in re.findall(r"memdesc<(\d+)x64x(?:128|256)xbf16", allocs)],
            max([int(n) for n in re.findall(r"async_wait [^{]*[{]num = (\d+)", text)] or [0])]

out = {}
rows = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "offs_ptr": "*i32", "index_ptr": "*i64",
        "a_scale_ptr": "*fp32", "b_scale_ptr": "*fp32"}
for gather in (False, True):  # OLMoE's second projection's input gradient: 128x256x64 tiles, four stages
    consts = dict(N=1024, K=2048, E=64, E_P2=64, TRANS_B=True, BM=128, BN=256, BK=64, NUM_PROGRAMS=132, WS=False,
                  TMA_STORE=True, GATHER=gather, SCALED=False)
    out[f"rows {gather}"] = ttgir(G._rows_mm_kernel, rows, {"R": "i32"}, consts, 8, 4)
# the FP8 form: OLMoE's first projection, e4m3 operands at SCALED_ROWS_CONFIG's tiles
bm, bn, bk, warps, stages = G.SCALED_ROWS_CONFIG
consts = dict(N=2048, K=2048, E=64, E_P2=64, TRANS_B=True, BM=bm, BN=bn, BK=bk, NUM_PROGRAMS=132, WS=False,
              TMA_STORE=True, GATHER=False, SCALED=True)
text = compiled(G._rows_mm_kernel, {**rows, "a_ptr": "*fp8e4nv", "b_ptr": "*fp8e4nv"}, {"R": "i32"}, consts, warps,
                stages).asm["ttgir"]
out["scaled"] = [text.count("async_tma_copy_global_to_local"), "pendings = 1" in text,
                 len(re.findall(r"warp_group_dot .*f8E4M3FN", text))]
wgrad = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "part_ptr": "*fp32", "offs_ptr": "*i32",
         "next_ptr": "*i32", "a_index_ptr": "*i64", "b_index_ptr": "*i64"}
for ga, gb in ((False, False), (True, False), (False, True)):  # the flat loop, OLMoE's w2
    consts = dict(M=1024, N=2048, E=64, E_P2=64, BM=128, BN=256, BK=64, NUM_PROGRAMS=132, WS=False, SLICES=2, CUT=0,
                  PIECE=0, LONGEST_FIRST=True, FLAT=True, ITEMS_P2=1, GATHER_A=ga, GATHER_B=gb)
    stages = G.WGRAD_CONFIG[4] if not (ga or gb) else G.WGRAD_GATHER_STAGES  # what a launch takes
    out[f"wgrad {ga} {gb}"] = ttgir(G._weight_grad_kernel, wgrad, {}, consts, 8, stages)
print(out)
"""


def test_the_gathering_loads_are_pipelined_for_hopper():
    """Compiled for sm_90 on the CPU (Triton 3.6, as a launch specializes aligned pointers): the FP8 product
    compiles to FP8 warp-group MMAs fed by pipelined TMA loads; the products that
    read token rows through an index load them by asynchronous copies in the software pipeline (the MMA waits
    for one group less than it issued), beside the weights' TMA loads, as the TMA-only forms do; a form Triton's
    pipeliner cannot take would load synchronously at every k-step. At five stages the weight gradient keeps
    as many buffers in flight gathering as it does by TMA alone at three."""
    from pip_cache import run_interpreted
    got = run_interpreted(SM90, interpret=False)
    assert got["rows False"][0] == 0 and got["rows False"][1] > 0 and got["rows False"][2], got
    assert got["wgrad False False"][0] == 0 and got["wgrad False False"][2], got
    # the FP8 product: both e4m3 operands by TMA into one FP8 warp-group MMA, overlapped with the next loads
    assert got["scaled"][0] > 0 and got["scaled"][1] and got["scaled"][2] == 1, got
    for name in ("rows True", "wgrad True False", "wgrad False True"):
        copies, tma, overlapped, _, _ = got[name]
        assert copies > 0 and tma > 0 and overlapped, (name, got)
    # the weight gradient's k-steps load the index as well as the rows it addresses: at five stages (what
    # grouped_gemm.WGRAD_GATHER_STAGES offers) three buffers an operand, as the TMA form has at three, and each
    # k-step waits for its own copies only (at three stages: two buffers, and a wait for every copy in flight)
    assert got["wgrad False False"][3] == [3, 3], got
    for name in ("wgrad True False", "wgrad False True"):
        assert got[name][3] == [3, 3] and got[name][4] >= 2, (name, got)


def test_the_products_fall_back_to_torch_where_the_kernels_do_not_run():
    """On CPU (and wherever the kernels do not apply) rows_mm, weight_grad_mm and linear are torch's
    grouped GEMM: the per-expert products, and linear's gradients those of torch._grouped_mm."""
    g = torch.Generator().manual_seed(1)
    counts = [3, 0, 9, 4]
    offs = experts.group_offsets(torch.tensor(counts))
    a = torch.randn(16, 8, generator=g, requires_grad=True)
    w = torch.randn(4, 8, 12, generator=g, requires_grad=True)
    assert not G.rows_available(a, w) and not G.wgrad_available(a, a)
    torch.testing.assert_close(G.rows_mm(a, w, offs), rows_ref(a, w, counts))
    torch.testing.assert_close(G.rows_mm(a, w.transpose(1, 2).contiguous(), offs, trans_b=True), rows_ref(a, w, counts))
    dy = torch.randn(16, 12, generator=g)
    torch.testing.assert_close(G.weight_grad_mm(a, dy, offs), wgrad_ref(a, dy, counts))
    got = G.linear(a, w, offs)
    want = torch._grouped_mm(a, w, offs=offs)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for x, y in zip(torch.autograd.grad(got, (a, w), dy), torch.autograd.grad(want, (a, w), dy)):
        torch.testing.assert_close(x, y)


def test_linear_compiles_without_graph_breaks():
    """The experts' product as the compiled blocks trace it (fullgraph: no break around the autograd
    Function, the availability checks or the environment switch), forward and backward."""
    g = torch.Generator().manual_seed(2)
    offs = experts.group_offsets(torch.tensor([6, 0, 10]))
    a = torch.randn(16, 8, generator=g).bfloat16().requires_grad_()  # the grouped GEMM's meta wants bf16
    w = torch.randn(3, 8, 16, generator=g).bfloat16().requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(G.linear, fullgraph=True, backend="aot_eager")
    got = compiled(a, w, offs)
    want = G.linear(a, w, offs)
    torch.testing.assert_close(got, want)
    dy = torch.randn(16, 16, generator=g).bfloat16()
    for x, y in zip(torch.autograd.grad(got, (a, w), dy), torch.autograd.grad(want, (a, w), dy)):
        torch.testing.assert_close(x, y)


def test_long_experts_are_cut_only_where_one_could_be_the_weight_gradients_tail(monkeypatch):
    """wgrad_cut: the small model of target 4 (262,144 rows, 64 experts, H100's 132 SMs) cuts experts
    past half a program's share and 1.5× the mean (uniform routing's 4,096 rows an expert: none) into
    pieces of a quarter of the share; OLMoE's shapes (128 or 64 tiles an expert) cut none; the fp32
    partials stay within PIECES_BUDGET, or nothing is cut; and the switch turns cutting off."""
    share = 262144 * 8 / 132
    cut, piece = G.wgrad_cut(262144, 64, 512, 512, 8, 64, 132)
    assert cut == int(share / 2) and piece % 64 == 0 and share / 4 <= piece < share / 4 + 64
    cut, piece = G.wgrad_cut(262144, 64, 256, 512, 4, 64, 132)  # w2's share is under 3× the mean
    assert cut == 1.5 * 4096 and 0 < piece < cut
    assert G.wgrad_cut(65536, 64, 2048, 2048, 128, 64, 132) == G.wgrad_cut(65536, 64, 1024, 2048, 64, 64, 132) == (0, 0)
    for rows in (1 << 20, 1 << 22):  # many rows of wide outputs: longer pieces, or none
        cut, piece = G.wgrad_cut(rows, 64, 512, 1024, 4, 64, 132)
        assert (cut, piece) == (0, 0) or (-(-rows // piece) + -(-rows // cut)) * 512 * 1024 * 4 <= G.PIECES_BUDGET
    assert G.wgrad_cut(1 << 20, 64, 512, 1024, 4, 64, 132)[1] > (1 << 20) * 4 / 132 / 4  # the budget decided
    monkeypatch.setattr(G, "CUT_LARGE_EXPERTS", False)
    assert G.wgrad_cut(262144, 64, 512, 512, 8, 64, 132) == (0, 0)


def test_the_kernels_are_switched_off_by_the_environment(monkeypatch):
    """MEGAMOE_GROUPED_GEMM=torch turns the kernels off where Triton is there (CI's CPU torch has none:
    stand one in); without Triton they are off whatever it says."""
    monkeypatch.setattr(G, "triton", object())
    monkeypatch.delenv("MEGAMOE_GROUPED_GEMM", raising=False)
    assert G.enabled()
    monkeypatch.setenv("MEGAMOE_GROUPED_GEMM", "torch")
    assert not G.enabled()
    monkeypatch.setenv("MEGAMOE_GROUPED_GEMM", "triton")
    assert G.enabled()
    monkeypatch.setattr(G, "triton", None)
    assert not G.enabled()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="TMA kernels run on Hopper or later; CI has no GPU and checks them under the interpreter")
@pytest.mark.parametrize("flat", [False, True])
def test_the_kernels_equal_torchs_grouped_gemm_on_cuda(monkeypatch, flat):
    """bf16, OLMoE's expert shapes at a few hundred tokens, random top-8 routing with empty experts:
    eager and compiled (the custom ops) against torch._grouped_mm (fp32 accumulation both); the
    uncut weight gradient's nested and flat loops (`WGRAD_FLAT`); operands read through a row index."""
    monkeypatch.setattr(G, "WGRAD_FLAT", flat)
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    counts = torch.zeros(64, dtype=torch.int64, device="cuda")
    counts[: 40] = torch.randint(0, 60, (40,), generator=g, device="cuda")
    offs = experts.group_offsets(counts)
    R = int(offs[-1])
    x, dh = torch.randn(R, 2048, generator=g, **bf), torch.randn(R, 2048, generator=g, **bf)
    w1 = torch.randn(64, 2048, 2048, generator=g, **bf) / 45
    assert G.rows_available(dh, w1, trans_b=True) and G.wgrad_available(x, dh)
    checks = [(lambda: G.rows_mm(dh, w1, offs, trans_b=True), torch._grouped_mm(dh, w1.transpose(1, 2), offs=offs)),
              (lambda: G.rows_mm(x, w1, offs), torch._grouped_mm(x, w1, offs=offs)),
              (lambda: G.weight_grad_mm(x, dh, offs), torch._grouped_mm(x.t(), dh, offs=offs))]
    # the small model's shapes with one expert at 3,000 of ~4,200 rows: cut into pieces (wgrad_cut)
    skewed = counts.clone()
    skewed[40] = 3000
    offs_s = experts.group_offsets(skewed)
    xs, dys = torch.randn(int(offs_s[-1]), 512, generator=g, **bf), torch.randn(int(offs_s[-1]), 512, generator=g, **bf)
    assert G.wgrad_cut(xs.shape[0], 64, 512, 512, 8, 64, torch.cuda.get_device_properties(0).multi_processor_count)[0] > 0
    checks.append((lambda: G.weight_grad_mm(xs, dys, offs_s), torch._grouped_mm(xs.t(), dys, offs=offs_s)))
    # token rows read in place through an index with repeats (the experts' gathered operands), cut and not
    tokens = torch.randn(R // 4 + 1, 2048, generator=g, **bf)
    index = torch.randint(0, tokens.shape[0], (R,), generator=g, device="cuda")
    index_s = torch.randint(0, xs.shape[0], (xs.shape[0],), generator=g, device="cuda")
    checks += [(lambda: G.rows_mm(tokens, w1, offs, a_index=index), torch._grouped_mm(tokens[index], w1, offs=offs)),
               (lambda: G.rows_mm(tokens, w1, offs, trans_b=True, a_index=index),
                torch._grouped_mm(tokens[index], w1.transpose(1, 2), offs=offs)),
               (lambda: G.weight_grad_mm(tokens, dh, offs, a_index=index), torch._grouped_mm(tokens[index].t(), dh, offs=offs)),
               (lambda: G.weight_grad_mm(xs, dys, offs_s, b_index=index_s),
                torch._grouped_mm(xs.t(), dys[index_s], offs=offs_s))]
    for fn, want in checks:
        for got in (fn(), torch.compile(fn, fullgraph=True)()):
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 1e-2, err


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="FP8 tensor cores: Hopper or later; CI has no GPU and checks the kernel under the interpreter")
def test_the_fp8_kernel_equals_torchs_scaled_grouped_gemm_on_cuda():
    """e4m3 rows and weights with rowwise scales (as `moe.fp8` quantizes them), OLMoE's first projection at a
    few hundred rows with empty experts: megamoe's kernel, eager and compiled (its custom op), against
    `torch._scaled_grouped_mm` (both accumulate in fp32 without promotion: fast accumulation)."""
    from megamoe.moe import fp8
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.zeros(64, dtype=torch.int64, device="cuda")
    counts[: 40] = torch.randint(0, 60, (40,), generator=g, device="cuda")
    offs = experts.group_offsets(counts)
    x = torch.randn(int(offs[-1]), 2048, generator=g, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(64, 2048, 2048, generator=g, device="cuda", dtype=torch.bfloat16) / 45  # [E, out, in]
    (xq, x_inv), (wq, w_inv) = fp8.quantize(x, -1), fp8.quantize(w, -1)
    assert G.scaled_rows_available(xq, wq)
    want = torch._scaled_grouped_mm(xq, wq.transpose(1, 2), x_inv.squeeze(-1), w_inv.squeeze(-1), offs=offs,
                                    out_dtype=torch.bfloat16, use_fast_accum=True).float()
    fn = lambda: G.scaled_rows_mm(xq, x_inv, wq, w_inv, offs)  # noqa: E731
    for got in (fn(), torch.compile(fn, fullgraph=True)()):
        assert got.dtype == torch.bfloat16
        assert ((got.float() - want).norm() / want.norm()).item() < 1e-2
