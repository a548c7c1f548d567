"""Expert GEMMs in FP8 (`moe.expert_precision: fp8`): e4m3 operands with rowwise scales.

Each of the experts' two products `x @ w[e]` (`swiglu`, `token_sums`) is computed as
    forward      out    = q(x)  @ q(w)        x scaled per row,  w per (expert, output column)
    grad input   grad_x = q(g)  @ q(w)ᵀ       g scaled per row,  w per (expert, input row)
    grad weight  grad_w = xᵀ @ g              in the input dtype (bf16), as DeepSeek-V3 and
                                              torchao keep the reduction over tokens
where q() rounds to float8_e4m3fn after multiplying by a power-of-two scale that maps the
slice's largest magnitude to at most 448 (powers of two: the scaling itself is exact). On CUDA the
two FP8 products are `grouped_gemm.scaled_rows_mm` (megamoe's kernel, Hopper and later) or
`torch._scaled_grouped_mm`; elsewhere they are computed from the same quantized values, dequantized,
one expert at a time — the same function, which the CPU tests check against an explicit
quantize-dequantize reference.

`token_sums` is the whole expert block where every expert is on this rank (dropless top-k): tokens in,
each token's weighted sum of its k expert outputs out, one autograd Function. Its first projection
quantizes each token once and gathers the e4m3 rows with their scales: the same values as quantizing
each of the token's k copies (a row's scale is its token's; so expert parallelism, which quantizes the
rows it receives through `swiglu`, agrees). Its backward makes each quantized gradient in the
kernel that makes the gradient (`fp8_fused`) instead of in a pass of its own: the weighted rows of
the output gradient, and SwiGLU's gradient; the activation is made again there for w2's gradient, not
kept. The weights' two quantized forms (`quantize_weight`) are made per call, or once per optimizer
step where the trainer keeps them across its micro-batches (`SwiGLUExperts.fp8_cache`,
`experts.cache_fp8_weights`).
"""

import torch
import torch.distributed as dist

from . import fp8_fused, fused_permute, grouped_gemm

E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


def kernel_available(x: torch.Tensor) -> bool:
    """The FP8 products' CUDA kernels run here (megamoe's, or `torch._scaled_grouped_mm` where it does not
    apply): bf16 rows on a Hopper-or-later GPU."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch, "_scaled_grouped_mm")
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


def quantize(t: torch.Tensor, dim: int, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """t in float8_e4m3fn with one power-of-two scale per slice along `dim`; returns (q, inv)
    where t ≈ q.float() * inv (inv keeps `dim` with size 1). `group`: the slices run on across the
    ranks of this process group (a tensor-parallel cut): their largest magnitude is the group's."""
    amax = t.abs().amax(dim=dim, keepdim=True).float()
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    amax = amax.clamp(min=1e-12)
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


def compiled_once(fn):
    """`fn(w)` (a weight's quantized forms) for use outside the model's graphs (the weight caches): compiled on
    CUDA at its first call, so each form is one fused reduction and one fused cast instead of eager's pass per
    operation; eager elsewhere."""
    compiled = None

    @torch.no_grad()
    def run(w: torch.Tensor) -> tuple[torch.Tensor, ...]:
        nonlocal compiled
        if not w.is_cuda:
            return fn(w.detach())
        if compiled is None:
            compiled = torch.compile(fn, dynamic=False)
        return compiled(w.detach())
    return run


quantize_weight_once = compiled_once(quantize_weight)


def refill(cache: tuple | None, fresh: tuple) -> tuple:
    """The cache to keep for the newly quantized forms `fresh`: `cache` with `fresh` copied into it where their
    shapes and devices agree (compiled graphs keep reading the same tensors), else `fresh` itself."""
    flat = lambda forms: [t for f in forms for t in (f if isinstance(f, tuple) else (f,))]  # noqa: E731
    if cache is None or any(a.shape != b.shape or a.device != b.device for a, b in zip(flat(cache), flat(fresh))):
        return fresh
    torch._foreach_copy_(flat(cache), flat(fresh))
    return cache


def _gather(q: torch.Tensor, inv: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows index[r] of per-token e4m3 values [T, K] and their scales [T, 1]: [N, K], [N, 1]
    (moved as bytes: the gather kernel and every device's indexing take uint8)."""
    rows = fused_permute.gather_rows(q.view(torch.uint8), index).view(torch.float8_e4m3fn)
    return rows, inv[index]


def _scaled_mm(a: torch.Tensor, a_inv: torch.Tensor, bt: torch.Tensor, bt_inv: torch.Tensor,
               counts: torch.Tensor, offs: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """[N, K] fp8 rows (scales [N, 1]) @ bt[e]ᵀ for per-expert bt [E, M, K] fp8 (K-major, as FP8 tensor
    cores take it; scales [E, M, 1]) → [N, M]. On CUDA `grouped_gemm`'s kernel where it runs, else
    `torch._scaled_grouped_mm`."""
    if offs is not None:
        if out_dtype == torch.bfloat16 and grouped_gemm.scaled_rows_available(a, bt):
            return grouped_gemm.scaled_rows_mm(a, a_inv, bt, bt_inv, offs)
        return torch._scaled_grouped_mm(a, bt.transpose(1, 2), a_inv.squeeze(-1), bt_inv.squeeze(-1), offs=offs,
                                        out_dtype=out_dtype, use_fast_accum=True)
    outs = [(rows.float() * s) @ (bt[e].float() * bt_inv[e]).T
            for e, (rows, s) in enumerate(zip(torch.split(a, counts.tolist()), torch.split(a_inv, counts.tolist())))]
    return torch.cat(outs).to(out_dtype) if outs else a.new_zeros(0, bt.shape[1], dtype=out_dtype)


def _forward_mm(aq, a_inv, w, wf, wf_inv, counts, offs, dtype) -> torch.Tensor:
    """q(a) @ q(w): w's forward form from the cache, or made here."""
    if wf is None:
        wf, wf_inv = quantize(w.transpose(1, 2).contiguous(), -1)  # [E, M, K], [E, M, 1]
    return _scaled_mm(aq, a_inv, wf, wf_inv, counts, offs, dtype)


def _input_grad_mm(gq, g_inv, w, wb, wb_inv, counts, offs, dtype) -> torch.Tensor:
    """q(g) @ q(w)ᵀ: w's input-gradient form as saved from the cache, or made here."""
    if wb is None:
        wb, wb_inv = quantize(w, -1)  # [E, K, M], [E, K, 1]
    return _scaled_mm(gq, g_inv, wb, wb_inv, counts, offs, dtype)


def _weight_grad(x: torch.Tensor, g: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
                 num_experts: int) -> torch.Tensor:
    """Σ over each expert's rows of xᵀ g: [E, K, M], in x's dtype."""
    if offs is not None:
        return grouped_gemm.weight_grad_mm(x, g, offs)
    grads = [rows.t() @ gr for rows, gr in zip(torch.split(x, counts.tolist()), torch.split(g, counts.tolist()))]
    return torch.stack(grads) if grads else x.new_zeros(num_experts, x.shape[1], g.shape[1])


def _swiglu_forward(rows, rows_inv, w1, w2, counts, offs, wf1, wf1_inv, wf2, wf2_inv, dtype):
    """(h [N, 2F], out [N, d]): [gate | up] = q(rows) @ q(w1[e]), out = q(silu(gate) · up) @ q(w2[e])."""
    h = _forward_mm(rows, rows_inv, w1, wf1, wf1_inv, counts, offs, dtype)
    aq, a_inv = fp8_fused.swiglu_quantized(h)  # [N, F]: silu(gate) · up, quantized
    return h, _forward_mm(aq, a_inv, w2, wf2, wf2_inv, counts, offs, dtype)


def _swiglu_backward(rows_of_x, h, g, gq, g_inv, w1, w2, counts, offs, wb1, wb1_inv, wb2, wb2_inv):
    """(grad of the rows [N, d], grad w1, grad w2) for the output rows' gradient g [N, d] (and its e4m3
    form gq, g_inv); rows_of_x(): the input rows in bf16 for w1's gradient (gathered only when needed)."""
    g_a = _input_grad_mm(gq, g_inv, w2, wb2, wb2_inv, counts, offs, g.dtype)  # [N, F]
    dh, dhq, dh_inv, a = fp8_fused.swiglu_backward_quantized(h, g_a)  # [N, 2F] ×2, [N, 1], [N, F]
    grad_w2 = _weight_grad(a, g, counts, offs, w2.shape[0])
    grad_rows = _input_grad_mm(dhq, dh_inv, w1, wb1, wb1_inv, counts, offs, g.dtype)  # [N, d]
    grad_w1 = _weight_grad(rows_of_x(), dh, counts, offs, w1.shape[0])
    return grad_rows, grad_w1.to(w1.dtype), grad_w2.to(w2.dtype)


class _FP8SwiGLU(torch.autograd.Function):
    """out = q(silu(gate) · up) @ q(w2[e])  with  [gate | up] = q(x) @ q(w1[e]), for rows x [N, d] sorted by
    expert (expert parallelism's received rows; routings other than dropless top-k). Keeps x and h, not the
    activation; the backward quantizes the output gradient, then makes SwiGLU's gradient with its e4m3 form
    and the activation again (for w2's weight gradient) in one pass (`fp8_fused`)."""

    @staticmethod
    def forward(ctx, x, w1, w2, counts, offs, wf1, wf1_inv, wb1, wb1_inv, wf2, wf2_inv, wb2, wb2_inv):
        xq, x_inv = quantize(x, -1)  # [N, d], scale per row
        h, out = _swiglu_forward(xq, x_inv, w1, w2, counts, offs, wf1, wf1_inv, wf2, wf2_inv, x.dtype)
        ctx.save_for_backward(x, w1, w2, counts, offs, h, wb1, wb1_inv, wb2, wb2_inv)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, counts, offs, h, wb1, wb1_inv, wb2, wb2_inv = ctx.saved_tensors
        grad = grad.contiguous()
        gq, g_inv = quantize(grad, -1)  # [N, d], scale per row
        grads = _swiglu_backward(lambda: x, h, grad, gq, g_inv, w1, w2, counts, offs, wb1, wb1_inv, wb2, wb2_inv)
        return (*grads, *[None] * 10)


class _FP8TokenSums(torch.autograd.Function):
    """y[t] = Σ_j weight[t, j] · (q(silu(gate) · up) @ q(w2[e]))  with  [gate | up] = q(x[t]) @ q(w1[e]), the
    experts' rows of token t being rows inverse[t·k + j] (every expert on this rank). The forward is
    `_FP8SwiGLU`'s on the tokens' e4m3 rows gathered, then the weighted sum (+ the block's residual, in the
    sum's pass), and keeps the tokens, h and the experts' output rows, not the activation. The backward
    makes each quantized gradient in the kernel that makes the gradient (`fp8_fused`): the weighted output
    gradient of each row with its e4m3 form and the routing weights' gradient in one pass, then SwiGLU's
    gradient with its e4m3 form and the activation again for w2's weight gradient in another."""

    @staticmethod
    def forward(ctx, x, w1, w2, counts, offs, index, inverse, weight, k: int, residual, wf1, wf1_inv, wb1, wb1_inv,
                wf2, wf2_inv, wb2, wb2_inv):
        xq, x_inv = quantize(x, -1)  # [T, d]: a row's scale is its token's
        rows, rows_inv = _gather(xq, x_inv, index)
        h, out = _swiglu_forward(rows, rows_inv, w1, w2, counts, offs, wf1, wf1_inv, wf2, wf2_inv, x.dtype)
        ctx.save_for_backward(x, w1, w2, counts, offs, index, inverse, weight, h, out, wb1, wb1_inv, wb2, wb2_inv)
        ctx.k = k
        return fused_permute.sum_rows(out, inverse.view(-1, k), residual, weight)  # [T, d] (+ residual)

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, counts, offs, index, inverse, weight, h, out, wb1, wb1_inv, wb2, wb2_inv = ctx.saved_tensors
        w_rows = torch.empty(index.numel(), dtype=weight.dtype, device=weight.device).scatter_(
            0, inverse, weight.reshape(-1))  # [N] each row's routing weight
        g, gq, g_inv, grad_w_rows = fp8_fused.combine_backward_quantized(grad.contiguous(), out, w_rows, index)
        grad_rows, grad_w1, grad_w2 = _swiglu_backward(lambda: fused_permute.gather_rows(x, index), h, g, gq, g_inv,
                                                       w1, w2, counts, offs, wb1, wb1_inv, wb2, wb2_inv)
        grad_x = fused_permute.sum_rows(grad_rows, inverse.view(-1, ctx.k))  # [T, d]
        grad_weight = grad_w_rows[inverse].view_as(weight).to(weight.dtype)  # [T, k]
        grad_residual = grad if ctx.needs_input_grad[9] else None
        return (grad_x, grad_w1, grad_w2, None, None, None, None, grad_weight, None, grad_residual, *[None] * 8)


NO_CACHE = (None, None, None, None)


def swiglu(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
           wq1: tuple = NO_CACHE, wq2: tuple = NO_CACHE) -> torch.Tensor:
    """The FP8 SwiGLU experts over rows x [N, d] sorted by expert, w1 [E, d, 2F], w2 [E, F, d], counts [E];
    offs (int32 group ends) selects the CUDA kernels, None the per-expert path; wq1, wq2: `quantize_weight`
    of w1, w2 made earlier, or Nones. Returns [N, d] in x's dtype."""
    return _FP8SwiGLU.apply(x, w1, w2, counts, offs, *wq1, *wq2)


def token_sums(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, counts: torch.Tensor, offs: torch.Tensor | None,
               index: torch.Tensor, inverse: torch.Tensor, weight: torch.Tensor, k: int, wq1: tuple = NO_CACHE,
               wq2: tuple = NO_CACHE, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The FP8 SwiGLU experts over tokens x [T, d] with k rows each (row r is token index[r], token t's j-th
    row is inverse[t·k + j]), each token's rows weighted by weight [T, k] and summed: [T, d]; plus `residual`
    [T, d] if given, added to the sum rounded to x's dtype in the sum's own pass (`fused_permute.sum_rows`)."""
    return _FP8TokenSums.apply(x, w1, w2, counts, offs, index, inverse, weight, k, residual, *wq1, *wq2)
