"""`fp8_fused`: the FP8 experts' backward kernels that quantize what they compute (SwiGLU's gradient,
the combine's row gradients), against their torch references and autograd."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.moe import fp8, fp8_fused

# Triton 3.6's interpreter casts fp32 to bf16 by truncation and to e4m3 by rounding half up (ties
# not to even, a mantissa carry into an odd exponent lost); the GPU rounds both to nearest even
# (cvt.rn), as torch does. The subprocess casts between these float types with torch instead, so
# the kernels' own logic (the fp32 math, the amax of the rounded row, the scale from its exponent
# bits) is what is checked bit for bit, with the GPU's rounding.
CASTS_TO_NEAREST = """
import numpy as _np, torch as _torch
import triton.language as _tl
import triton.runtime.interpreter as _interp
_TORCH = {_tl.float32: (_torch.float32, _np.int32, _torch.int32),  # the float, its bits in numpy and in torch
          _tl.bfloat16: (_torch.bfloat16, _np.int16, _torch.int16),
          _tl.float8e4nv: (_torch.float8_e4m3fn, _np.uint8, _torch.uint8)}
_convert_float = _interp._convert_float
def _convert_to_nearest(input, input_dtype, output_dtype, rounding_mode):
    if input_dtype not in _TORCH or output_dtype not in _TORCH:
        return _convert_float(input, input_dtype, output_dtype, rounding_mode)
    (src, src_bits, _), (dst, _, dst_bits) = _TORCH[input_dtype], _TORCH[output_dtype]
    bits = _torch.from_numpy(_np.ascontiguousarray(input).reshape(-1).view(src_bits))
    return bits.view(src).to(dst).view(dst_bits).numpy().reshape(_np.shape(input))
_interp._convert_float = _convert_to_nearest
"""

FUSED_INTERPRETED = CASTS_TO_NEAREST + """
import torch
from megamoe.moe import fp8, fp8_fused as Q
assert Q.triton is not None
gen = torch.Generator().manual_seed(0)
bits = lambda q: q.view(torch.uint8)
types = lambda xs: [(x.shape, x.dtype) for x in xs]
# the largest relative difference in 2^-8 steps (a bf16 rounding is at most one): the message if not exact
steps = lambda x, y: float(((x.float() - y.float()).abs() / y.float().abs().clamp(min=1e-30) * 2 ** 8).max())
res = {}

n, f = 37, 300  # off the row block (4 rows at F = 300) and the column block (512)
h = (2 * torch.randn(n, 2 * f, generator=gen)).bfloat16()
g = torch.randn(n, f, generator=gen).bfloat16()
g[3] = 0  # dh's row 3 all zeros: amax at quantize's 1e-12 floor
g[5, 7] = 3e4  # a huge value
g[9] *= 1e-8  # a tiny row
h[11, :f], h[11, f:], g[11] = 64, 0.5, 1e-3 * g[11]  # sigmoid(64) = 1: d up = 64 g exactly
g[11, 0] = 1.75 * 2 ** -6  # row 11's amax is d up = 1.75 exactly (448 / amax a power of two)
dh, dhq, dh_inv, a = Q.launch_swiglu_backward(h, g)
ref = Q.swiglu_backward_reference(h, g)
q, inv = fp8.quantize(dh, -1)
res["swiglu"] = dict(
    dh_exact=torch.equal(dh, ref[0]), dh_steps=steps(dh, ref[0]),
    a_exact=torch.equal(a, ref[3]), a_steps=steps(a, ref[3]),
    q_is_quantize=torch.equal(bits(dhq), bits(q)), inv_is_quantize=torch.equal(dh_inv, inv),
    q_is_reference=torch.equal(bits(dhq), bits(ref[1])), inv_is_reference=torch.equal(dh_inv, ref[2]),
    special_inv=[float(dh_inv[3]), float(dh_inv[11]), float(dh.float()[11].abs().max())],
    same_types=types((dh, dhq, dh_inv, a)) == types(ref))
res["swiglu_empty"] = types(Q.launch_swiglu_backward(h[:0], g[:0])) == types(Q.swiglu_backward_reference(h[:0], g[:0]))
# the forward's kernel: the same activation (fp32, rounded once), quantized
aq, a_inv = Q.launch_swiglu_quantized(h)
q, inv = fp8.quantize(a, -1)
res["forward"] = dict(q_is_quantize=torch.equal(bits(aq), bits(q)), inv_is_quantize=torch.equal(a_inv, inv),
                      same_types=types((aq, a_inv)) == types(Q.swiglu_quantized_reference(h)),
                      empty=types(Q.launch_swiglu_quantized(h[:0])) == types(Q.swiglu_quantized_reference(h[:0])))

t, k, d = 11, 3, 300  # 33 rows: off the row block (8 rows at d = 300) and the column block (512)
grad = torch.randn(t, d, generator=gen).bfloat16()
token_of_row = torch.randperm(t * k, generator=gen) // k  # each token's k rows, in expert order
out = torch.randn(t * k, d, generator=gen).bfloat16()
weight = torch.rand(t * k, generator=gen)  # fp32, not bf16 values: the kernel rounds them as torch's cast
grad[2, 5] = 3e4  # a huge value
grad[4] *= 1e-8  # a tiny token
grad[6] = 0.25 * grad[6].clamp(-1, 1)
grad[6, 0] = 3.5  # its rows with weight 1: amax 3.5 = 1.75 · 2 (448 / amax a power of two)
grad[7] = 0.25 * grad[7].clamp(-1, 1)
grad[7, 0] = 3.515625  # with weight 1: amax just above 1.75 · 2 (the next bf16 value)
weight[token_of_row == 6] = 1
weight[token_of_row == 7] = 1
weight[token_of_row == 8] = 0  # all-zero rows
gr, gq, g_inv, grad_w = Q.launch_combine_backward(grad, out, weight, token_of_row)
ref = Q.combine_backward_reference(grad, out, weight, token_of_row)
q, inv = fp8.quantize(gr, -1)
rows = lambda tok: (token_of_row == tok).nonzero()[0, 0]
res["combine"] = dict(
    g_exact=torch.equal(gr, ref[0]), g_steps=steps(gr, ref[0]),
    q_is_quantize=torch.equal(bits(gq), bits(q)), inv_is_quantize=torch.equal(g_inv, inv),
    q_is_reference=torch.equal(bits(gq), bits(ref[1])), inv_is_reference=torch.equal(g_inv, ref[2]),
    grad_w=float(((grad_w - ref[3]).abs() / ref[3].abs().clamp(min=1e-30)).max()),
    special_inv=[float(g_inv[rows(8)]), float(g_inv[rows(6)]), float(g_inv[rows(7)])],
    same_types=types((gr, gq, g_inv, grad_w)) == types(ref))
no_rows = (grad, out[:0], weight[:0], token_of_row[:0])
res["combine_empty"] = types(Q.launch_combine_backward(*no_rows)) == types(Q.combine_backward_reference(*no_rows))
print(res)
"""


def test_the_kernels_quantize_their_own_bf16_output_and_equal_the_references():
    """The forward's SwiGLU kernel quantizes exactly the activation the backward's kernel makes again. Both
    backward kernels under Triton's interpreter on the CPU (its float casts rounding to nearest, as the
    GPU's: `CASTS_TO_NEAREST`), for sizes off their blocks, with an all-zero row (amax at quantize's
    1e-12 floor: inv 2^-48), a huge value (3e4), a tiny row (1e-8), and rows whose amax is 1.75 · 2^e
    (448 / amax exactly a power of two: the scale's one delicate case) or the bf16 value above it.

    dh, a and g equal the references bit for bit: both compute in fp32 from the same bf16 inputs with
    the same operations in the same order and round once (the interpreter's sigmoid and numpy's fp32
    arithmetic agree with torch's here; on the GPU, fused multiply-adds and its exp may move a value
    by one bf16 rounding, which `fp8.quantize` of the kernel's own output still matches). dhq / gq and
    their inverse scales equal `fp8.quantize` of the kernel's own bf16 output exactly (e4m3 bits, fp32
    inv). grad_w is the fp32 sum in another order: within a relative 1e-5 of each."""
    from pip_cache import run_interpreted
    res = run_interpreted(FUSED_INTERPRETED)
    s, c = res["swiglu"], res["combine"]
    assert s["q_is_quantize"] and s["inv_is_quantize"] and s["same_types"] and res["swiglu_empty"], s
    assert s["dh_exact"] and s["a_exact"] and s["q_is_reference"] and s["inv_is_reference"], s
    assert s["special_inv"] == [2.0 ** -48, 2.0 ** -8, 1.75], s  # 1.75 · 2^8 = 448: scale 2^8, not 2^7
    assert all(res["forward"].values()), res["forward"]  # the forward's quantized activation: the backward's a
    assert c["q_is_quantize"] and c["inv_is_quantize"] and c["same_types"] and res["combine_empty"], c
    assert c["g_exact"] and c["q_is_reference"] and c["inv_is_reference"], c
    assert c["grad_w"] < 1e-5, c
    assert c["special_inv"] == [2.0 ** -48, 2.0 ** -7, 2.0 ** -6], c  # 3.5 · 2^7 = 448; 3.515625 · 2^7 > 448


def _rounding_close(x: torch.Tensor, want: torch.Tensor, roundings: int = 1):
    """x (bf16) is want (float64) after `roundings` bf16 roundings (2^-8 of the value each), give or
    take fp32 arithmetic: 1e-6 of the row's largest (cancellation in d gate's 1 + gate · (1 − σ))."""
    err = (x.double() - want).abs()
    bound = want.abs() * roundings * 2 ** -8 + 1e-6 * want.abs().amax(-1, keepdim=True)
    assert bool((err <= bound).all()), float((err / bound).max())


def test_the_references_are_the_gradients_of_the_torch_forms():
    """The CPU path: `swiglu_backward_reference`'s dh is autograd's gradient of silu(gate) · up in
    float64 and its a that forward, to a bf16 rounding; `combine_backward_reference`'s grad_w is
    autograd's gradient of each row's weight in y[t] = Σ_rows of t w · out (float64, to the fp32
    sum), its g the bf16 weight times the token's gradient rounded once (and autograd's gradient of out
    to the weight's and g's bf16 roundings); both quantized forms are `fp8.quantize` of the bf16 rows,
    and the public functions give the references' tensors on the CPU."""
    gen = torch.Generator().manual_seed(1)
    n, f = 29, 40
    h = (2 * torch.randn(n, 2 * f, generator=gen)).bfloat16()
    g = torch.randn(n, f, generator=gen).bfloat16()
    dh, dhq, dh_inv, a = fp8_fused.swiglu_backward_reference(h, g)
    hh = h.double().requires_grad_()
    gate, up = hh.chunk(2, dim=-1)
    want_a = F.silu(gate) * up
    want_a.backward(g.double())
    _rounding_close(dh, hh.grad)
    _rounding_close(a, want_a.detach())
    q, inv = fp8.quantize(dh, -1)
    assert torch.equal(dhq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(dh_inv, inv)
    assert [(x.shape, x.dtype) for x in (dh, dhq, dh_inv, a)] == [
        ((n, 2 * f), torch.bfloat16), ((n, 2 * f), torch.float8_e4m3fn), ((n, 1), torch.float32),
        ((n, f), torch.bfloat16)]
    public = fp8_fused.swiglu_backward_quantized(h, g)
    assert all(torch.equal(x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x,
                           y.view(torch.uint8) if y.dtype == torch.float8_e4m3fn else y)
               for x, y in zip(public, (dh, dhq, dh_inv, a)))

    t, k, d = 7, 2, 24
    grad = torch.randn(t, d, generator=gen).bfloat16()
    token_of_row = torch.randperm(t * k, generator=gen) // k
    out = torch.randn(t * k, d, generator=gen).bfloat16()
    weight = torch.rand(t * k, generator=gen)
    g_rows, gq, g_inv, grad_w = fp8_fused.combine_backward_reference(grad, out, weight, token_of_row)
    ww, oo = weight.double().requires_grad_(), out.double().requires_grad_()
    y = torch.zeros(t, d, dtype=torch.float64).index_add(0, token_of_row, ww[:, None] * oo)
    y.backward(grad.double())
    torch.testing.assert_close(grad_w.double(), ww.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(g_rows, (grad[token_of_row].double() * weight.bfloat16().double()[:, None]).bfloat16())
    _rounding_close(g_rows, oo.grad, roundings=2)  # the weight's bf16 rounding and g's
    q, inv = fp8.quantize(g_rows, -1)
    assert torch.equal(gq.view(torch.uint8), q.view(torch.uint8)) and torch.equal(g_inv, inv)
    assert [(x.shape, x.dtype) for x in (g_rows, gq, g_inv, grad_w)] == [
        ((t * k, d), torch.bfloat16), ((t * k, d), torch.float8_e4m3fn), ((t * k, 1), torch.float32),
        ((t * k,), torch.float32)]
    public = fp8_fused.combine_backward_quantized(grad, out, weight, token_of_row)
    assert torch.equal(public[0], g_rows) and torch.equal(public[1].view(torch.uint8), gq.view(torch.uint8))
    assert torch.equal(public[2], g_inv) and torch.equal(public[3], grad_w)


SM90 = """
import re
import subprocess
import tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from megamoe.moe import fp8_fused as Q

def compiled(kernel, pointers, consts):
    names = list(kernel.arg_names)
    signature = {**pointers, "n_rows": "i32", **{n: "constexpr" for n in consts}}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in pointers}  # as a launch specializes
    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})

out = {}
bf16 = "*bf16"
for name, kernel, pointers, consts in (  # OLMoE-1B-7B's widths, at the launches' blocks
        ("swiglu", Q._swiglu_backward_kernel, dict(h_ptr=bf16, g_ptr=bf16, dh_ptr=bf16, dhq_ptr="*fp8e4nv",
                                                   inv_ptr="*fp32", a_ptr=bf16),
         dict(F=1024, BLOCK_R=Q._rows_per_program(2048), BLOCK_F=1024)),
        ("combine", Q._combine_backward_kernel, dict(grad_ptr=bf16, out_ptr=bf16, w_ptr="*fp32", tok_ptr="*i64",
                                                     g_ptr=bf16, gq_ptr="*fp8e4nv", inv_ptr="*fp32", gw_ptr="*fp32"),
         dict(D=2048, BLOCK_R=Q._rows_per_program(2048), BLOCK_D=2048)),
        ("forward", Q._swiglu_quantized_kernel, dict(h_ptr=bf16, aq_ptr="*fp8e4nv", inv_ptr="*fp32"),
         dict(F=1024, BLOCK_R=Q._rows_per_program(1024), BLOCK_F=1024))):
    ptx = compiled(kernel, pointers, consts).asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        open(f"{tmp}/k.ptx", "w").write(ptx)
        ptxas = [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", f"{tmp}/k.ptx", "-o", f"{tmp}/k.cubin"]
        info = subprocess.run(ptxas, capture_output=True, text=True, check=True).stderr
    out[name] = [len(re.findall(r"cvt\\.rn\\.satfinite\\.e4m3x2\\.f32", ptx)), "lg2" in ptx,
                 len(re.findall(r"st\\.global\\.v4", ptx)), re.findall(r"(\\d+) bytes spill stores", info)]
print(out)
"""


def test_the_kernels_compile_for_hopper_with_rounding_casts_and_no_spills():
    """Compiled for sm_90 on the CPU (Triton 3.6, ptxas) at OLMoE-1B-7B's widths and the launches' blocks
    (2 rows of 2,048 values a program, 8 warps; the forward's kernel 4 rows of 1,024): the e4m3 values come from the hardware's round-to-nearest-even
    saturating cast (what the interpreter test's casts model), the scale takes no log2, the bf16 rows are stored
    in 16-byte vectors, and no register spills. Timings on a GPU are not checked here."""
    from pip_cache import run_interpreted
    got = run_interpreted(SM90, interpret=False)
    for name, (fp8_casts, log2, vector_stores, spills) in got.items():
        assert fp8_casts > 0 and not log2 and spills == ["0"], (name, got)
        assert vector_stores >= 3 or name == "forward", (name, got)  # the forward writes no bf16 rows


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="e4m3 conversion: sm_89 or later; CI has no GPU and runs the kernels under the interpreter")
def test_the_kernels_on_cuda_quantize_their_own_output_and_agree_with_the_references():
    """On the GPU at OLMoE's widths (2F = d = 2,048), eager and compiled (the custom ops): the forward's quantized
    activation is that of the backward's kernel bit for bit; the quantized forms
    are `fp8.quantize` of each kernel's own bf16 output bit for bit; dh, a and g are the references' to one bf16
    rounding (the GPU's fused multiply-adds and exp), grad_w to fp32 summation order."""
    K = fp8_fused
    g = torch.Generator(device="cuda").manual_seed(0)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    n, f, t, k = 3000, 1024, 400, 8
    h, gr = 3 * torch.randn(n, 2 * f, generator=g, **bf), torch.randn(n, f, generator=g, **bf)
    grad, out = torch.randn(t, 2 * f, generator=g, **bf), torch.randn(t * k, 2 * f, generator=g, **bf)
    w_rows = torch.rand(t * k, generator=g, device="cuda")
    token_of_row = torch.randint(0, t, (t * k,), generator=g, device="cuda")
    assert K.available(h)
    # the forward's kernel quantizes the activation the backward's kernel makes again, eager and compiled
    want_q, want_inv = fp8.quantize(K.swiglu_backward_quantized(h, gr)[3], -1)
    for aq, a_inv in (K.swiglu_quantized(h), torch.compile(K.swiglu_quantized, fullgraph=True)(h)):
        assert torch.equal(aq.view(torch.uint8), want_q.view(torch.uint8)) and torch.equal(a_inv, want_inv)
    for run in (lambda fn, *a: fn(*a), lambda fn, *a: torch.compile(fn, fullgraph=True)(*a)):
        for fn, ref, args in ((K.swiglu_backward_quantized, K.swiglu_backward_reference, (h, gr)),
                              (K.combine_backward_quantized, K.combine_backward_reference,
                               (grad, out, w_rows, token_of_row))):
            got, want = run(fn, *args), ref(*args)
            q, inv = fp8.quantize(got[0], -1)
            assert torch.equal(got[1].view(torch.uint8), q.view(torch.uint8)) and torch.equal(got[2], inv)
            assert [(x.shape, x.dtype) for x in got] == [(x.shape, x.dtype) for x in want]
            step = want[0].float().abs() * 2 ** -7 + 1e-6  # one bf16 rounding step
            assert bool(((got[0].float() - want[0].float()).abs() <= step).all())
            # a: one bf16 step; grad_w: 2,048 fp32 products summed in another order (against the largest sum)
            torch.testing.assert_close(got[3].float(), want[3].float(), rtol=2 ** -7 if want[3].dtype == torch.bfloat16
                                       else 1e-5, atol=1e-6 * float(want[3].abs().max()) + 1e-6)
