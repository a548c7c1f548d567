"""Attention's projections with their token-wide products in FP8 (`model.attention_precision: fp8`).

For y = x @ wᵀ (x [M, K], w [N, K], as `F.linear`):
    forward      y      = q(x) @ q(w)ᵀ      x scaled per row (token), w per row (output feature)
    grad input   grad_x = q(g) @ q(wᵀ)ᵀ     g scaled per row (token), w per column (input feature)
    grad weight  grad_w = gᵀ @ x            in the input dtype (bf16): the reduction over tokens stays
                                            in bf16, as the FP8 experts keep theirs (`moe.fp8`)
q() is `moe.fp8.quantize`: e4m3 after a power-of-two scale per slice. On CUDA (Hopper or later, bf16)
both FP8 products are `torch._scaled_mm` with rowwise scales; elsewhere the same quantized values are
dequantized and multiplied in fp32: the same function, which the CPU tests check. The weight's two
forms are made in each forward and backward, or once per optimizer step where the trainer keeps them
across its micro-batches (`Linear.fp8_cache`, filled by `moe.experts.cache_fp8_weights` with the
experts'; one rank of tensor parallelism only: the TP layers quantize per call).

Under tensor parallelism a slice can span the ranks: the input features of a row-parallel product (x's
rows and w's rows in the forward), the output features of a column-parallel one (g's rows and w's
columns in the backward). Their largest magnitude is then taken over the group (`in_group`,
`out_group`), so every rank scales as the 1-rank model does.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.fp8 import compiled_once, quantize, refill


def _mm(aq: torch.Tensor, a_inv: torch.Tensor, bq: torch.Tensor, b_inv: torch.Tensor,
        dtype: torch.dtype) -> torch.Tensor:
    """aq [M, K] @ bq [N, K]ᵀ, both e4m3 with per-row scales ([M, 1], [N, 1]) → [M, N] in dtype."""
    if aq.is_cuda and dtype == torch.bfloat16 and torch.cuda.get_device_capability(aq.device) >= (9, 0):
        return torch._scaled_mm(aq, bq.t(), scale_a=a_inv, scale_b=b_inv.t(), out_dtype=dtype, use_fast_accum=True)
    return ((aq.float() * a_inv) @ (bq.float() * b_inv).t()).to(dtype)


NO_CACHE = (None, None, None, None)


def weight_forms(w: torch.Tensor, in_group=None, out_group=None) -> tuple[torch.Tensor, ...]:
    """w [N, K] → (wq [N, K], w_inv [N, 1], wtq [K, N], wt_inv [K, 1]): the forward's operand scaled per output
    feature, and the input gradient's (wᵀ, stored K-major as `torch._scaled_mm` takes it) per input feature."""
    wq, w_inv = quantize(w, -1, in_group)
    wtq, wt_inv = quantize(w.t().contiguous(), -1, out_group)
    return wq, w_inv, wtq, wt_inv


weight_forms_once = compiled_once(weight_forms)  # outside the model's graphs: the cache


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, in_group, out_group, wq, w_inv, wtq, wt_inv):
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_inv = quantize(x2, -1, in_group)  # [M, K], [M, 1]
        if wq is None:
            wq, w_inv = quantize(weight, -1, in_group)  # [N, K], [N, 1]
        ctx.save_for_backward(x2, weight, wtq, wt_inv)
        ctx.shape, ctx.out_group = x.shape, out_group
        return _mm(xq, x_inv, wq, w_inv, x.dtype).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x2, weight, wtq, wt_inv = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            gq, g_inv = quantize(g, -1, ctx.out_group)  # [M, N], [M, 1]
            if wtq is None:  # [K, N], [K, 1]: per input feature
                wtq, wt_inv = quantize(weight.t().contiguous(), -1, ctx.out_group)
            grad_x = _mm(gq, g_inv, wtq, wt_inv, grad.dtype).view(ctx.shape)
        if ctx.needs_input_grad[1]:
            grad_w = (g.t() @ x2.to(g.dtype)).to(weight.dtype)  # [N, K]
        return grad_x, grad_w, *[None] * 6


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, in_group=None, out_group=None,
               forms: tuple = NO_CACHE) -> torch.Tensor:
    """`F.linear(x, weight)` (no bias) with its forward and input-gradient products in FP8; `in_group` /
    `out_group`: the tensor-parallel group the input / output features are cut across, if any; `forms`:
    `weight_forms(weight)` made earlier, or Nones."""
    return _FP8Linear.apply(x, weight, in_group, out_group, *forms)


class Linear(nn.Linear):
    """`nn.Linear` without bias whose products run in FP8 where `fp8` is set (the class attribute is the
    default: bench/bench_ab.py flips it for an A/B). Its parameter is `weight`, as nn.Linear's."""

    fp8 = False

    def __init__(self, in_features: int, out_features: int, fp8: bool = False):
        super().__init__(in_features, out_features, bias=False)
        if fp8:
            self.fp8 = True
        # `weight_forms` of the weight, used while fp8_cache_valid (plain attributes, not buffers: no state
        # dict, no dtype cast; refilled in place so compiled graphs keep them)
        self.fp8_cache: tuple[torch.Tensor, ...] | None = None
        self.fp8_cache_valid = False

    @torch.no_grad()
    def refresh_fp8_cache(self) -> None:
        """Quantize the weight now, for every forward and backward until `fp8_cache_valid` is cleared."""
        self.fp8_cache = refill(self.fp8_cache, weight_forms_once(self.weight))
        self.fp8_cache_valid = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8:
            return F.linear(x, self.weight)
        return fp8_linear(x, self.weight, forms=self.fp8_cache if self.fp8_cache_valid else NO_CACHE)
