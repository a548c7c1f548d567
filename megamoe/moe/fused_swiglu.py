"""SwiGLU with per-row routing weights and the experts' second projection, its backward in one pass.

    a = silu(gate) · up · w        h = [gate | up]: [N, 2F], w: [N] (each expert row's weight)
    out = grouped_mm(a, w2)        w2: [E, F, d]   (the products: `grouped_gemm`)

The forward is torch ops (inductor fuses the activation into one kernel) and keeps h and w, not a.
The backward needs, per row, with g = grad_out · w2ᵀ the gradient of `a`,

    d gate = g · w · up · silu'(gate)      d up = g · w · silu(gate)      d w = Σ_j g · silu(gate) · up

and `a` itself for w2's gradient aᵀ · grad_out. Left to inductor the first two were two kernels, a
pointwise one writing d h and a row reduction for d w (5.4 + 2.2 ms a step on OLMoE-1B-7B at
micro-batch 2, 16 layers, H100), each reading h and g again, and `a` [N, F] was kept from the
forward (134 MB a layer there: 2 GiB of that step's 31.2 GiB peak). `weighted_swiglu_backward`
reads h, g and w once and writes d h, d w and a again: a Triton kernel,
exposed to torch.compile as a `triton_op`. Elsewhere (CPU, no Triton) `backward_reference`
computes the same in torch; the kernel is checked against autograd of the torch form under Triton's
interpreter on the CPU (tests/test_experts.py). d w comes out in w's dtype, summed in fp32.
"""

import torch
import torch.nn.functional as F

from . import fused_permute, grouped_gemm

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: experts use the torch form
    triton = None


def reference(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The torch form: silu(gate) · up · w, the weight cast to h's dtype."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up * w[:, None].to(h.dtype)


def available(h: torch.Tensor) -> bool:
    return triton is not None and h.is_cuda


def backward_reference(h: torch.Tensor, w: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(d h, d w, a) of `reference` for the gradient g of its output, in torch: what the kernel
    computes, in fp32, rounded once to h's (d h, a) and w's (d w) dtypes."""
    gate, up = h.float().chunk(2, dim=-1)
    wf, gf = w.float()[:, None], g.float()
    sig = torch.sigmoid(gate)
    silu = gate * sig
    dh = torch.cat([gf * wf * up * sig * (1 + gate * (1 - sig)), gf * wf * silu], dim=-1)
    return dh.to(h.dtype), (gf * silu * up).sum(-1).to(w.dtype), (silu * up * wf).to(h.dtype)


if triton is not None:
    @triton.jit
    def _backward_kernel(h_ptr, w_ptr, g_ptr, dh_ptr, dw_ptr, a_ptr, n_rows, F: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_F: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        row_ok = rows < n_rows
        w = tl.load(w_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            ok = row_ok[:, None] & (cols < F)[None, :]
            hrow = h_ptr + rows[:, None] * (2 * F) + cols[None, :]
            gate = tl.load(hrow, mask=ok, other=0.0).to(tl.float32)
            up = tl.load(hrow + F, mask=ok, other=0.0).to(tl.float32)
            g = tl.load(g_ptr + rows[:, None] * F + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            sig = tl.sigmoid(gate)
            silu = gate * sig
            acc += tl.sum(g * silu * up, axis=1)
            gw = g * w[:, None]
            drow = dh_ptr + rows[:, None] * (2 * F) + cols[None, :]
            tl.store(drow, (gw * up * sig * (1 + gate * (1 - sig))).to(dh_ptr.dtype.element_ty), mask=ok)
            tl.store(drow + F, (gw * silu).to(dh_ptr.dtype.element_ty), mask=ok)
            tl.store(a_ptr + rows[:, None] * F + cols[None, :], (silu * up * w[:, None]).to(a_ptr.dtype.element_ty),
                     mask=ok)
        tl.store(dw_ptr + rows, acc.to(dw_ptr.dtype.element_ty), mask=row_ok)

    def launch_backward(h: torch.Tensor, w: torch.Tensor, g: torch.Tensor, wrap=lambda kernel: kernel):
        """(d h, d w, a) as `backward_reference`; `wrap` is torch.compile's `wrap_triton` under the
        custom op, the plain kernel otherwise (the interpreter test)."""
        n, f = g.shape
        h, w, g = h.contiguous(), w.contiguous(), g.contiguous()
        dh, dw, a = torch.empty_like(h), torch.empty(n, dtype=w.dtype, device=h.device), torch.empty_like(g, dtype=h.dtype)
        block_r = 8
        wrap(_backward_kernel)[(triton.cdiv(n, block_r),)](
            h, w, g, dh, dw, a, n, f, BLOCK_R=block_r, BLOCK_F=min(256, triton.next_power_of_2(f)), num_warps=4)
        return dh, dw, a

    @torch.library.triton_op("megamoe::weighted_swiglu_backward", mutates_args=())
    def weighted_swiglu_backward(h: torch.Tensor, w: torch.Tensor,
                                 g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return launch_backward(h, w, g, torch.library.wrap_triton)


def _backward(h, w, w2, offs, grad_out, index, needs_w2: bool):
    """(d h, d w, d w2) of rows_mm(reference(h, w), w2, offs) for the gradient grad_out of its rows (with
    `index`: row r's gradient is grad_out[index[r]], read in place)."""
    g = grouped_gemm.rows_mm(grad_out, w2, offs, trans_b=True, a_index=index)  # [N, F]: the gradient of a
    if available(h):  # compiled code calls the custom op; eager code the kernel, without the op's dispatch
        dh, dw, a = (torch.ops.megamoe.weighted_swiglu_backward(h, w, g) if torch.compiler.is_compiling()
                     else launch_backward(h, w, g))
    else:
        dh, dw, a = backward_reference(h, w, g)
    grad_w2 = grouped_gemm.weight_grad_mm(a, grad_out, offs, b_index=index) if needs_w2 else None
    return dh, dw, grad_w2


class _SwiGLUDown(torch.autograd.Function):
    """grouped_mm(silu(gate) · up · w, w2): keeps h and w, recomputes `a` in the backward's one pass."""

    @staticmethod
    def forward(ctx, h, w, w2, offs):
        ctx.save_for_backward(h, w, w2, offs)
        return grouped_gemm.rows_mm(reference(h, w), w2, offs)

    @staticmethod
    def backward(ctx, grad_out):
        h, w, w2, offs = ctx.saved_tensors
        return *_backward(h, w, w2, offs, grad_out.contiguous(), None, ctx.needs_input_grad[2]), None


class _SwiGLUDownSum(torch.autograd.Function):
    """_SwiGLUDown's rows summed into their tokens (+ residual); the backward's products read each row's
    token gradient in place (no [N, d] gathered copy)."""

    @staticmethod
    def forward(ctx, h, w, w2, offs, token_of_row, inverse, k: int, residual):
        ctx.save_for_backward(h, w, w2, offs, token_of_row)
        out = grouped_gemm.rows_mm(reference(h, w), w2, offs)  # [N, d]
        return fused_permute.sum_rows(out, inverse.view(-1, k), residual)  # [T, d]

    @staticmethod
    def backward(ctx, grad):
        h, w, w2, offs, token_of_row = ctx.saved_tensors
        grad = grad.contiguous()
        dh, dw, grad_w2 = _backward(h, w, w2, offs, grad, token_of_row, ctx.needs_input_grad[2])
        return dh, dw, grad_w2, None, None, None, None, grad if ctx.needs_input_grad[7] else None


def swiglu_down(h: torch.Tensor, w: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """torch._grouped_mm(silu(gate) · up · w, w2, offs=offs) for h [N, 2F], w [N], w2 [E, F, d]: the
    activation is not kept for the backward, which differentiates it and recomputes it in one pass."""
    return _SwiGLUDown.apply(h, w, w2, offs)


def swiglu_down_sum(h: torch.Tensor, w: torch.Tensor, w2: torch.Tensor, offs: torch.Tensor, tokens) -> torch.Tensor:
    """swiglu_down's rows summed into their tokens, [T, d], plus tokens.residual (`experts.TokenRows`)."""
    return _SwiGLUDownSum.apply(h, w, w2, offs, tokens.token_of_row, tokens.inverse, tokens.k, tokens.residual)
