"""The FP8 experts' passes that end in a rowwise quantization, each one Triton kernel.

    swiglu_quantized(h [N, 2F]) -> aq [N, F] e4m3, a_inv [N, 1] fp32
        the forward's activation a = silu(gate) · up (fp32, rounded once to h's dtype) quantized for
        the second projection, in one pass over h (inductor's code of the torch form read h twice)
    swiglu_backward_quantized(h [N, 2F], g [N, F])
        -> dh [N, 2F], dhq [N, 2F] e4m3, dh_inv [N, 1] fp32, a [N, F]
        h = [gate | up], g the gradient of a = silu(gate) · up:
        d gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))      d up = g · silu(gate)
    combine_backward_quantized(grad [T, d], out [N, d], weight_rows [N], token_of_row [N])
        -> g [N, d], gq [N, d] e4m3, g_inv [N, 1] fp32, grad_w [N] fp32
        g = grad[token_of_row] · weight_rows (the weight in grad's dtype first, as the combine's
        backward casts it), grad_w = Σ_col grad[token_of_row] · out (the routing weight's gradient)

(dhq, dh_inv) and (gq, g_inv) are `fp8.quantize(·, -1)` of the dh and g returned, bit for bit: the
quantized operand of the next FP8 product (grad input of w1, of w2) is the bf16 gradient's, as a
pass of its own would make it, and the bf16 one stays for the weight gradient. They replace
the kernels inductor makes of the torch forms, which write the bf16 rows and read them again to
quantize: here one program holds whole rows in registers (F = 1,024 and d = 2,048 at OLMoE-1B-7B: a
row of 2,048 values), rounds them to bf16, takes the amax of the rounded values and writes both forms.
Everything is computed in fp32 from the inputs and rounded once, as in the backward's torch references
(`*_reference`: the CPU path, and wherever Triton is missing; the forward's reference is the torch form
in h's dtype, as the CPU path computed it before); grad_w is summed in fp32 in the kernel's order.
The scale is derived from amax's exponent bits, not log2 / exp2 (approximate on the GPU): the largest
power of two p with amax · p ≤ 448, which is what `quantize`'s exp2(floor(log2(448 / amax))) gives for
every bf16 amax and its 1e-12 floor (for fp32 rows the two can differ where 448 / amax is within an
fp32 rounding of a power of two).

Checked against the references under Triton's interpreter on the CPU and on an H100
(tests/test_fp8_fused.py); the backward's two ran at 4.98 and 4.94 ms a step of OLMoE-1B-7B at mb 2
(docs/performance.md, session 24), where inductor's code had taken 7.8 and 5.7.
"""

import torch

from . import fp8

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch references
    triton = None


@torch.compiler.assume_constant_result
def _converts_e4m3(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 9)


# The forward's SwiGLU and its quantization by `swiglu_quantized`'s kernel (True) or inductor's code of the torch
# form (False, for A/B runs: it compiles them as a reduction that reads h twice, persistent rows stopping at 1024)
FUSED_FORWARD = True


def available(t: torch.Tensor) -> bool:
    """The kernels run here: Triton and a CUDA device that converts to e4m3 (sm_89 and later)."""
    return triton is not None and t.is_cuda and _converts_e4m3(
        t.device.index if t.device.index is not None else torch.cuda.current_device())


def swiglu_backward_reference(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dh, dhq, dh_inv, a) in torch: dh and a computed in fp32 and rounded once to h's dtype (the
    formulas of `fused_swiglu.backward_reference` with weight 1), dh quantized per row."""
    gate, up = h.float().chunk(2, dim=-1)
    gf = g.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dh = torch.cat([gf * up * sig * (1 + gate * (1 - sig)), gf * silu], dim=-1).to(h.dtype)  # [N, 2F]
    dhq, dh_inv = fp8.quantize(dh, -1)  # one scale a row over both halves
    return dh, dhq, dh_inv, (silu * up).to(h.dtype)


def swiglu_quantized_reference(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aq, a_inv) = `fp8.quantize(silu(gate) · up, -1)` for h = [gate | up], in torch (in h's dtype)."""
    gate, up = h.chunk(2, dim=-1)
    return fp8.quantize(torch.nn.functional.silu(gate) * up, -1)


def combine_backward_reference(grad: torch.Tensor, out: torch.Tensor, weight_rows: torch.Tensor,
                               token_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(g, gq, g_inv, grad_w) in torch: g = grad[token_of_row] · weight_rows in grad's dtype (the
    exact fp32 product rounded once), quantized per row; grad_w summed in fp32."""
    rows = grad[token_of_row]  # [N, d]
    g = (rows.float() * weight_rows.to(grad.dtype).float()[:, None]).to(grad.dtype)
    gq, g_inv = fp8.quantize(g, -1)
    return g, gq, g_inv, (rows.float() * out.float()).sum(-1)


def _rows_per_program(width: int) -> int:
    """Rows a program holds: 2 at a row of 2,048 values (at 8 warps 16 values a thread for each
    [rows, width] tensor), more for narrow rows, up to 16."""
    return max(1, min(16, 4096 // width))


if triton is not None:
    @triton.jit
    def _quantize_scale(amax):
        """(scale, inv) for each row's amax [R] (> 0, normal): the largest power of two p with
        amax · p ≤ 448 = 1.75 · 2^8, from the exponent bits: amax = m · 2^e, m in [1, 2), gives
        p = 2^(8 − e), halved where m > 1.75 (mantissa field above 0x600000); inv = 1 / p."""
        bits = amax.to(tl.int32, bitcast=True)
        k = 8 - ((bits >> 23) - 127) - ((bits & 0x7FFFFF) > 0x600000).to(tl.int32)  # in [-120, 48]
        scale = ((k + 127) << 23).to(tl.float32, bitcast=True)
        inv = ((127 - k) << 23).to(tl.float32, bitcast=True)
        return scale, inv

    @triton.jit
    def _swiglu_backward_kernel(h_ptr, g_ptr, dh_ptr, dhq_ptr, inv_ptr, a_ptr, n_rows, F: tl.constexpr,
                                BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (cols < F)[None, :]  # [BLOCK_R, BLOCK_F]
        hrow = rows[:, None] * (2 * F) + cols[None, :]
        frow = rows[:, None] * F + cols[None, :]
        gate = tl.load(h_ptr + hrow, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + hrow + F, mask=ok, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + frow, mask=ok, other=0.0).to(tl.float32)
        sig = tl.sigmoid(gate)
        silu = gate * sig
        # the bf16 gradient, and its values again in fp32: what is quantized (masked columns are 0)
        dgate = (g * up * sig * (1 + gate * (1 - sig))).to(dh_ptr.dtype.element_ty)
        dup = (g * silu).to(dh_ptr.dtype.element_ty)
        dgate_f, dup_f = dgate.to(tl.float32), dup.to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(dgate_f), axis=1), tl.max(tl.abs(dup_f), axis=1))  # [BLOCK_R]
        scale, inv = _quantize_scale(tl.maximum(amax, 1e-12))  # quantize's floor: a zero row gets inv 2^-48
        tl.store(dh_ptr + hrow, dgate, mask=ok)
        tl.store(dh_ptr + hrow + F, dup, mask=ok)
        qty = dhq_ptr.dtype.element_ty
        tl.store(dhq_ptr + hrow, tl.clamp(dgate_f * scale[:, None], -448.0, 448.0).to(qty), mask=ok)
        tl.store(dhq_ptr + hrow + F, tl.clamp(dup_f * scale[:, None], -448.0, 448.0).to(qty), mask=ok)
        tl.store(inv_ptr + rows, inv, mask=row_ok)
        tl.store(a_ptr + frow, (silu * up).to(a_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _swiglu_quantized_kernel(h_ptr, aq_ptr, inv_ptr, n_rows, F: tl.constexpr, BLOCK_R: tl.constexpr,
                                 BLOCK_F: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_F)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (cols < F)[None, :]
        hrow = rows[:, None] * (2 * F) + cols[None, :]
        gate = tl.load(h_ptr + hrow, mask=ok, other=0.0).to(tl.float32)
        up = tl.load(h_ptr + hrow + F, mask=ok, other=0.0).to(tl.float32)
        a = (gate * tl.sigmoid(gate) * up).to(h_ptr.dtype.element_ty).to(tl.float32)  # the activation, rounded
        scale, inv = _quantize_scale(tl.maximum(tl.max(tl.abs(a), axis=1), 1e-12))
        tl.store(aq_ptr + rows[:, None] * F + cols[None, :],
                 tl.clamp(a * scale[:, None], -448.0, 448.0).to(aq_ptr.dtype.element_ty), mask=ok)
        tl.store(inv_ptr + rows, inv, mask=row_ok)

    @triton.jit
    def _combine_backward_kernel(grad_ptr, out_ptr, w_ptr, tok_ptr, g_ptr, gq_ptr, inv_ptr, gw_ptr, n_rows,
                                 D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        ok = row_ok[:, None] & (cols < D)[None, :]  # [BLOCK_R, BLOCK_D]
        tok = tl.load(tok_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        # the routing weight in the gradient's dtype, as the combine's backward multiplies it
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(g_ptr.dtype.element_ty).to(tl.float32)
        grad = tl.load(grad_ptr + tok[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        out = tl.load(out_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(gw_ptr + rows, tl.sum(grad * out, axis=1), mask=row_ok)
        g = (grad * w[:, None]).to(g_ptr.dtype.element_ty)
        g_f = g.to(tl.float32)
        scale, inv = _quantize_scale(tl.maximum(tl.max(tl.abs(g_f), axis=1), 1e-12))
        drow = rows[:, None] * D + cols[None, :]
        tl.store(g_ptr + drow, g, mask=ok)
        tl.store(gq_ptr + drow, tl.clamp(g_f * scale[:, None], -448.0, 448.0).to(gq_ptr.dtype.element_ty), mask=ok)
        tl.store(inv_ptr + rows, inv, mask=row_ok)

    def launch_swiglu_backward(h: torch.Tensor, g: torch.Tensor, wrap=lambda kernel: kernel, config=None):
        """(dh, dhq, dh_inv, a) as `swiglu_backward_reference`; `wrap` is torch.compile's `wrap_triton`
        under the custom op, the plain kernel otherwise (the interpreter test); `config`: (rows a
        program, warps), for `bench/bench_fp8_fused.py`'s sweep."""
        n, f = g.shape
        h, g = h.contiguous(), g.contiguous()
        dh = torch.empty_like(h)
        dhq = torch.empty(n, 2 * f, dtype=torch.float8_e4m3fn, device=h.device)
        dh_inv = torch.empty(n, 1, dtype=torch.float32, device=h.device)
        a = torch.empty_like(g, dtype=h.dtype)
        block_f = triton.next_power_of_2(f)
        block_r, warps = config or (_rows_per_program(2 * block_f), 8)
        if n:
            wrap(_swiglu_backward_kernel)[(triton.cdiv(n, block_r),)](
                h, g, dh, dhq, dh_inv, a, n, f, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps)
        return dh, dhq, dh_inv, a

    def launch_swiglu_quantized(h: torch.Tensor, wrap=lambda kernel: kernel, config=None):
        """(aq, a_inv) as `swiglu_quantized_reference`, the activation computed in fp32 and rounded once."""
        n, f = h.shape[0], h.shape[1] // 2
        h = h.contiguous()
        aq = torch.empty(n, f, dtype=torch.float8_e4m3fn, device=h.device)
        a_inv = torch.empty(n, 1, dtype=torch.float32, device=h.device)
        block_f = triton.next_power_of_2(f)
        block_r, warps = config or (_rows_per_program(block_f), 8)
        if n:
            wrap(_swiglu_quantized_kernel)[(triton.cdiv(n, block_r),)](
                h, aq, a_inv, n, f, BLOCK_R=block_r, BLOCK_F=block_f, num_warps=warps)
        return aq, a_inv

    def launch_combine_backward(grad: torch.Tensor, out: torch.Tensor, weight_rows: torch.Tensor,
                                token_of_row: torch.Tensor, wrap=lambda kernel: kernel, config=None):
        """(g, gq, g_inv, grad_w) as `combine_backward_reference`; `wrap` as in `launch_swiglu_backward`."""
        n, d = out.shape
        grad, out = grad.contiguous(), out.contiguous()
        weight_rows, token_of_row = weight_rows.contiguous(), token_of_row.contiguous()
        g = torch.empty(n, d, dtype=grad.dtype, device=grad.device)
        gq = torch.empty(n, d, dtype=torch.float8_e4m3fn, device=grad.device)
        g_inv = torch.empty(n, 1, dtype=torch.float32, device=grad.device)
        grad_w = torch.empty(n, dtype=torch.float32, device=grad.device)
        block_d = triton.next_power_of_2(d)
        block_r, warps = config or (_rows_per_program(block_d), 8)
        if n:
            wrap(_combine_backward_kernel)[(triton.cdiv(n, block_r),)](
                grad, out, weight_rows, token_of_row, g, gq, g_inv, grad_w, n, d, BLOCK_R=block_r,
                BLOCK_D=block_d, num_warps=warps)
        return g, gq, g_inv, grad_w

    @torch.library.triton_op("megamoe::swiglu_backward_quantized", mutates_args=())
    def _swiglu_backward_op(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                      torch.Tensor]:
        return launch_swiglu_backward(h, g, torch.library.wrap_triton)

    @torch.library.triton_op("megamoe::swiglu_quantized", mutates_args=())
    def _swiglu_quantized_op(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch_swiglu_quantized(h, torch.library.wrap_triton)

    @torch.library.triton_op("megamoe::combine_backward_quantized", mutates_args=())
    def _combine_backward_op(grad: torch.Tensor, out: torch.Tensor, weight_rows: torch.Tensor,
                             token_of_row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                  torch.Tensor]:
        return launch_combine_backward(grad, out, weight_rows, token_of_row, torch.library.wrap_triton)


def swiglu_backward_quantized(h: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(dh [N, 2F], dhq [N, 2F] e4m3, dh_inv [N, 1] fp32, a [N, F]) for h = [gate | up] [N, 2F] and the
    gradient g [N, F] of silu(gate) · up: the gradient of h, `fp8.quantize(dh, -1)` and the activation.
    On CUDA the kernel (compiled code calls the custom op; eager code launches it), else the reference."""
    if not available(h):
        return swiglu_backward_reference(h, g)
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.swiglu_backward_quantized(h, g)
    return launch_swiglu_backward(h, g)


def swiglu_quantized(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(aq [N, F] e4m3, a_inv [N, 1] fp32): silu(gate) · up for h = [gate | up] [N, 2F], quantized per row
    (the forward's second operand) in one pass over h. On CUDA the kernel, else the reference."""
    if not (FUSED_FORWARD and available(h)):
        return swiglu_quantized_reference(h)
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.swiglu_quantized(h)
    return launch_swiglu_quantized(h)


def combine_backward_quantized(grad: torch.Tensor, out: torch.Tensor, weight_rows: torch.Tensor,
                               token_of_row: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(g [N, d], gq [N, d] e4m3, g_inv [N, 1] fp32, grad_w [N] fp32) for the tokens' output gradient
    grad [T, d], the experts' output rows out [N, d], each row's routing weight [N] and token [N]: each
    row's gradient, `fp8.quantize(g, -1)` and the gradient of each row's weight. On CUDA the kernel,
    else the reference."""
    if not available(grad):
        return combine_backward_reference(grad, out, weight_rows, token_of_row)
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.combine_backward_quantized(grad, out, weight_rows, token_of_row)
    return launch_combine_backward(grad, out, weight_rows, token_of_row)
