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

Dropless top-k gives each token k rows, copies of it, as the first projection's input.
`gathered_grouped_mm` quantizes each token once and gathers the e4m3 rows with their scales: the
same values as quantizing each row (a row's scale is its token's; so expert parallelism, which
quantizes the rows it receives, agrees), in an eighth of the quantizing pass at top-8, a gathered
copy of 1 byte an element instead of 2, and no [T·k, d] copy kept for the backward (its weight
gradient gathers the bf16 rows again). The second projection's output gradient is not a copy of
its token's: the combine weights each row (`dispatch`). The weights' two quantized forms
(`quantize_weight`) are made per call, or once per optimizer step where the trainer keeps them
across its micro-batches (`SwiGLUExperts.fp8_cache`, `experts.cache_fp8_weights`).
"""

import torch

from . import fused_permute, grouped_gemm

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


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [E, K, M] → (wf [E, M, K], wf_inv [E, M, 1], wb [E, K, M], wb_inv [E, K, 1]): the forward's
    operand, scaled per (expert, output column) and stored column-major as the kernel wants it, and
    the input gradient's (wᵀ), scaled per (expert, input row); w row-major is wᵀ column-major."""
    wf, wf_inv = quantize(w.transpose(1, 2).contiguous(), -1)
    wb, wb_inv = quantize(w, -1)
    return wf, wf_inv, wb, wb_inv


_compiled_quantize_weight = None


@torch.no_grad()
def quantize_weight_once(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`quantize_weight` outside the model's graphs (the weight cache): compiled on CUDA, so each
    form is one fused reduction and one fused cast instead of eager's pass per operation."""
    global _compiled_quantize_weight
    if not w.is_cuda:
        return quantize_weight(w.detach())
    if _compiled_quantize_weight is None:
        _compiled_quantize_weight = torch.compile(quantize_weight, dynamic=False)
    return _compiled_quantize_weight(w.detach())


def _gather(q: torch.Tensor, inv: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows index[r] of per-token e4m3 values [T, K] and their scales [T, 1]: [N, K], [N, 1]
    (moved as bytes: the gather kernel and every device's indexing take uint8)."""
    rows = fused_permute.gather_rows(q.view(torch.uint8), index).view(torch.float8_e4m3fn)
    return rows, inv[index]


def _scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
               counts: torch.Tensor, offs: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[N, K] fp8 rows (scales [N, 1]) @ per-expert [E, K, M] fp8 (scales [E, 1, M]) → [N, M]."""
    if offs is not None:
        return torch._scaled_grouped_mm(a, b, a_inv.squeeze(-1), b_inv.squeeze(1), offs=offs,
                                        out_dtype=out_dtype, use_fast_accum=True)
    outs = [(rows.float() * s) @ (b[e].float() * b_inv[e])
            for e, (rows, s) in enumerate(zip(torch.split(a, counts.tolist()), torch.split(a_inv, counts.tolist())))]
    return torch.cat(outs).to(out_dtype) if outs else a.new_zeros(0, b.shape[-1], dtype=out_dtype)


def _forward_mm(aq, a_inv, w, wf, wf_inv, counts, offs, dtype) -> torch.Tensor:
    """q(a) @ q(w): w's forward form from the cache, or made here."""
    if wf is None:
        wf, wf_inv = quantize(w.transpose(1, 2).contiguous(), -1)  # [E, M, K], [E, M, 1]
    return _scaled_mm(aq, a_inv, wf.transpose(1, 2), wf_inv.transpose(1, 2), counts, offs, dtype)


def _input_grad_mm(gq, g_inv, w, wb, wb_inv, counts, offs, dtype) -> torch.Tensor:
    """q(g) @ q(w)ᵀ: w's input-gradient form as saved from the cache, or made here."""
    if wb is None:
        wb, wb_inv = quantize(w, -1)  # [E, K, M], [E, K, 1]
    return _scaled_mm(gq, g_inv, wb.transpose(1, 2), wb_inv.transpose(1, 2), counts, offs, dtype)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
                 num_experts: int) -> torch.Tensor:
    """Σ over each expert's rows of xᵀ g: [E, K, M], in x's dtype."""
    if offs is not None:
        return grouped_gemm.weight_grad_mm(x, g, offs)
    grads = [rows.t() @ gr for rows, gr in zip(torch.split(x, counts.tolist()), torch.split(g, counts.tolist()))]
    return torch.stack(grads) if grads else x.new_zeros(num_experts, x.shape[1], g.shape[1])


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, counts, offs, wf, wf_inv, wb, wb_inv):
        xq, x_inv = quantize(x, -1)  # [N, K], scale per row
        ctx.save_for_backward(x, w, counts, offs, wb, wb_inv)
        return _forward_mm(xq, x_inv, w, wf, wf_inv, counts, offs, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w, counts, offs, wb, wb_inv = ctx.saved_tensors
        gq, g_inv = quantize(grad.contiguous(), -1)  # [N, M], scale per row
        grad_x = _input_grad_mm(gq, g_inv, w, wb, wb_inv, counts, offs, grad.dtype)
        grad_w = _weight_grad(x, grad, counts, offs, w.shape[0])
        return grad_x, grad_w.to(w.dtype), None, None, None, None, None, None


class _FP8GatheredMM(torch.autograd.Function):
    """x[index] @ w[e] for tokens x [T, K] with k rows each (row r is token index[r]; token t's j-th
    row is inverse[t·k + j]): each token quantized once and its e4m3 row gathered. Backward: the rows'
    input gradients summed into their tokens; the weight gradient from the tokens' bf16 rows."""

    @staticmethod
    def forward(ctx, x, w, counts, offs, index, inverse, k: int, wf, wf_inv, wb, wb_inv):
        xq, x_inv = quantize(x, -1)  # [T, K]: a row's scale is its token's
        rows, rows_inv = _gather(xq, x_inv, index)
        ctx.save_for_backward(x, w, counts, offs, index, inverse, wb, wb_inv)
        ctx.k = k
        return _forward_mm(rows, rows_inv, w, wf, wf_inv, counts, offs, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, w, counts, offs, index, inverse, wb, wb_inv = ctx.saved_tensors
        grad = grad.contiguous()
        gq, g_inv = quantize(grad, -1)  # [N, M]: the rows' gradients differ, scaled per row
        grad_rows = _input_grad_mm(gq, g_inv, w, wb, wb_inv, counts, offs, grad.dtype)
        grad_x = fused_permute.sum_rows(grad_rows, inverse.view(-1, ctx.k))
        grad_w = _weight_grad(fused_permute.gather_rows(x, index), grad, counts, offs, w.shape[0])
        return grad_x, grad_w.to(w.dtype), None, None, None, None, None, None, None, None, None


NO_CACHE = (None, None, None, None)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
               wq: tuple = NO_CACHE) -> torch.Tensor:
    """x [N, K] rows sorted by expert, w [E, K, M], counts [E]; offs (int32 group ends) selects the
    CUDA kernels, None the per-expert path; wq: `quantize_weight(w)` made earlier, or Nones.
    Returns [N, M] in x's dtype."""
    return _FP8GroupedMM.apply(x, w, counts, offs, *wq)


def gathered_grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
                        index: torch.Tensor, inverse: torch.Tensor, k: int, wq: tuple = NO_CACHE) -> torch.Tensor:
    """grouped_mm(x[index], w, ...) for tokens x [T, K] with k rows each: [T·k, M]."""
    return _FP8GatheredMM.apply(x, w, counts, offs, index, inverse, k, *wq)
