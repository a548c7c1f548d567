"""Expert GEMMs in FP8 (`moe.expert_precision: fp8`): e4m3 operands with rowwise scales.

`grouped_mm(x, w, counts)` is `x @ w[e]` for each expert's rows, differentiable, with
    forward      out    = q(x)  @ q(w)        x scaled per row,  w per (expert, output column)
    grad input   grad_x = q(g)  @ q(w)ᵀ       g scaled per row,  w per (expert, input row)
    grad weight  grad_w = xᵀ @ g              in the input dtype (bf16), as DeepSeek-V3 and
                                              torchao keep the reduction over tokens
where q() rounds to float8_e4m3fn after multiplying by a power-of-two scale that maps the
slice's largest magnitude to at most 448 (powers of two: the scaling itself is exact). On CUDA the
two FP8 products are `torch._scaled_grouped_mm` (Hopper and later); elsewhere they are computed
from the same quantized values, dequantized, one expert at a time — the same function, which the
CPU tests check against an explicit quantize-dequantize reference.
"""

import torch

from . import grouped_gemm

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def kernel_available(x: torch.Tensor) -> bool:
    """`torch._scaled_grouped_mm` runs here: bf16 rows on a Hopper-or-later GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def quantize(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """t in float8_e4m3fn with one power-of-two scale per slice along `dim`; returns (q, inv)
    where t ≈ q.float() * inv (inv keeps `dim` with size 1)."""
    amax = t.abs().amax(dim=dim, keepdim=True).float().clamp(min=1e-12)
    scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / amax)))
    q = (t.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale.reciprocal()


def _scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
               counts: torch.Tensor, offs: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[N, K] fp8 rows (scales [N, 1]) @ per-expert [E, K, M] fp8 (scales [E, 1, M]) → [N, M]."""
    if offs is not None:
        return torch._scaled_grouped_mm(a, b, a_inv.squeeze(-1), b_inv.squeeze(1), offs=offs,
                                        out_dtype=out_dtype, use_fast_accum=True)
    outs = [(rows.float() * s) @ (b[e].float() * b_inv[e])
            for e, (rows, s) in enumerate(zip(torch.split(a, counts.tolist()), torch.split(a_inv, counts.tolist())))]
    return torch.cat(outs).to(out_dtype) if outs else a.new_zeros(0, b.shape[-1], dtype=out_dtype)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
                 num_experts: int) -> torch.Tensor:
    """Σ over each expert's rows of xᵀ g: [E, K, M], in x's dtype."""
    if offs is not None:
        return grouped_gemm.weight_grad_mm(x, g, offs)
    grads = [rows.t() @ gr for rows, gr in zip(torch.split(x, counts.tolist()), torch.split(g, counts.tolist()))]
    return torch.stack(grads) if grads else x.new_zeros(num_experts, x.shape[1], g.shape[1])


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, offs):
        xq, x_inv = quantize(x, -1)  # [N, K], scale per row
        # w [E, K, M]: scale per (expert, column) over K; the kernel wants it column-major
        wq, w_inv = quantize(w.transpose(1, 2).contiguous(), -1)  # [E, M, K], [E, M, 1]
        ctx.save_for_backward(x, w, counts, offs)
        return _scaled_mm(xq, x_inv, wq.transpose(1, 2), w_inv.transpose(1, 2), counts, offs, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w, counts, offs = ctx.saved_tensors
        gq, g_inv = quantize(grad.contiguous(), -1)  # [N, M], scale per row
        # wᵀ [E, M, K]: scale per (expert, row of w) over M; w row-major is wᵀ column-major
        wq, w_inv = quantize(w, -1)  # [E, K, M], [E, K, 1]
        grad_x = _scaled_mm(gq, g_inv, wq.transpose(1, 2), w_inv.transpose(1, 2), counts, offs, grad.dtype)
        grad_w = _weight_grad(x, grad, counts, offs, w.shape[0])
        return grad_x, grad_w.to(w.dtype), None, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None) -> torch.Tensor:
    """x [N, K] rows sorted by expert, w [E, K, M], counts [E]; offs (int32 group ends) selects the
    CUDA kernels, None the per-expert path. Returns [N, M] in x's dtype."""
    return _FP8GroupedMM.apply(x, w, counts, offs)
