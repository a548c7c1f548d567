"""SwiGLU experts stored stacked, so one grouped GEMM runs every local expert.

w1: [E, d, 2F] (gate and up projections side by side), w2: [E, F, d]. On CUDA one grouped
GEMM per projection runs all experts, forward and backward (`grouped_gemm`: Triton kernels on
Hopper, `torch._grouped_mm` elsewhere); on CPU a per-expert loop computes the same thing from the
same weights. With `fp8=True` both projections run in e4m3 with rowwise scales (`fp8`); the weights'
quantized forms are made each call, or once for an optimizer step's micro-batches between
`cache_fp8_weights` and `release_fp8_weights` (the trainer's loop, when it runs several a step).

Given `TokenRows` (dropless top-k on one rank), the experts take the tokens [T, d] and return each
token's sum of its k weighted outputs. Where the grouped products run, the token rows are then read
in place by the kernels instead of through a gathered [T·k, d] copy where the experts are narrow
(hidden size ≤ `IN_PLACE_MAX_FFN`): the first projection and its weight gradient read x's rows
(`READ_TOKENS_IN_PLACE`), the second projection's input and weight gradients read the output
gradient's (`READ_GRADIENT_IN_PLACE`); elsewhere the rows are gathered.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..model.fp8_linear import Linear as FP8Linear
from . import fp8 as fp8_mm
from . import fused_permute, fused_swiglu, grouped_gemm

# The token rows read in place by the first projection and its weight gradient (True), or gathered into a
# copy first (False); the same for the output gradient in the second projection's backward. None: in place
# where the experts' hidden size is at most IN_PLACE_MAX_FFN. The indexed loads (pointer loads, not TMA) slow
# the products' main loop, a cost that grows with the hidden size, while the copy they save does not: on one
# H100 (2026-12-07, docs/performance.md, session 19) both reads in place made OLMoE's forward+backward (F 1024)
# 9.0% slower and the small MoE's (d 512, F 256) 2.8% faster.
READ_TOKENS_IN_PLACE: bool | None = None
READ_GRADIENT_IN_PLACE: bool | None = None
IN_PLACE_MAX_FFN = 256


def _in_place(switch: bool | None, ffn_hidden: int) -> bool:
    return ffn_hidden <= IN_PLACE_MAX_FFN if switch is None else switch


class TokenRows(NamedTuple):
    """Dropless top-k's rows of the tokens: row r (in expert order) is token token_of_row[r], token t's
    j-th copy is row inverse[t·k + j]; `residual` [T, d] (or None) is added to the tokens' sums."""
    token_of_row: torch.Tensor
    inverse: torch.Tensor
    k: int
    residual: torch.Tensor | None = None


def grouped_mm_available(x: torch.Tensor) -> bool:
    return x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16


def group_offsets(counts: torch.Tensor) -> torch.Tensor:
    """[E] end row of each expert's group, int32 as `torch._grouped_mm` requires.

    The cast comes after the cumsum, not as its `dtype=`: inductor rewrites the cumsum of a
    constant (expert choice's equal loads, `torch.full`) into int64 whatever `dtype=` asked."""
    return torch.cumsum(counts, 0).to(torch.int32)


def _act(h: torch.Tensor, row_weight: torch.Tensor | None) -> torch.Tensor:
    """SwiGLU of [n, 2F] (gate | up) → [n, F], each row times its weight when given."""
    gate, up = h.chunk(2, dim=-1)
    a = F.silu(gate) * up
    return a if row_weight is None else a * row_weight[:, None].to(a.dtype)


class SwiGLUExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, ffn_hidden: int, fp8: bool = False):
        super().__init__()
        self.num_experts, self.ffn_hidden, self.fp8 = num_experts, ffn_hidden, fp8
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, 2 * ffn_hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, ffn_hidden, d_model))
        # fp8: w1's and w2's `fp8.quantize_weight` forms, used while fp8_cache_valid (plain attributes, not
        # buffers: no state dict, no dtype cast, no broadcast; refilled in place so compiled graphs keep them)
        self.fp8_cache: tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None
        self.fp8_cache_valid = False

    def _fp8_weights(self) -> tuple[tuple, tuple]:
        return self.fp8_cache if self.fp8_cache_valid else (fp8_mm.NO_CACHE, fp8_mm.NO_CACHE)

    @torch.no_grad()
    def refresh_fp8_cache(self) -> None:
        """Quantize w1 and w2 now, for every forward and backward until `fp8_cache_valid` is cleared."""
        fresh = tuple(fp8_mm.quantize_weight_once(w) for w in (self.w1, self.w2))
        self.fp8_cache = fp8_mm.refill(self.fp8_cache, fresh)
        self.fp8_cache_valid = True

    def forward(self, x: torch.Tensor, counts: torch.Tensor, grouped: bool | None = None,
                row_weight: torch.Tensor | None = None, tokens: TokenRows | None = None) -> torch.Tensor:
        """x: [N, d] rows sorted by expert; counts: [E] rows per expert; row_weight: [N] scales
        each row's activation before the second projection (expert(x) · weight, as one pass
        with SwiGLU). Returns [N, d]. With `tokens`: x [T, d] tokens whose rows these are, and
        returns each token's sum of its rows' outputs (+ tokens.residual), [T, d]."""
        if grouped is None:
            grouped = grouped_mm_available(x)
        if tokens is not None:
            return self._tokens(x, counts, grouped, row_weight, tokens)
        return self._rows(x, counts, grouped, row_weight)

    def _rows(self, x, counts, grouped: bool, row_weight) -> torch.Tensor:
        if self.fp8:  # unweighted rows: dispatch weights FP8 experts' outputs in its combine
            assert row_weight is None, "FP8 experts take unweighted rows"
            offs = group_offsets(counts) if grouped and fp8_mm.kernel_available(x) else None
            return fp8_mm.swiglu(x, self.w1, self.w2, counts, offs, *self._fp8_weights())  # [N, d]
        if grouped:
            offs = group_offsets(counts)
            h = grouped_gemm.linear(x, self.w1, offs)  # [N, 2F]
            if row_weight is not None:  # the activation recomputed in its backward's one pass
                return fused_swiglu.swiglu_down(h, row_weight, self.w2, offs)  # [N, d]
            return grouped_gemm.linear(_act(h, None), self.w2, offs)  # [N, d]
        sizes = counts.tolist()
        weights = torch.split(row_weight, sizes) if row_weight is not None else [None] * len(sizes)
        outs = [_act(rows @ self.w1[e], w) @ self.w2[e]
                for e, (rows, w) in enumerate(zip(torch.split(x, sizes), weights))]
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[-1])

    def fp8_token_sums(self, x: torch.Tensor, counts: torch.Tensor, tokens: TokenRows, weight: torch.Tensor,
                       grouped: bool | None = None) -> torch.Tensor:
        """FP8 experts over tokens x [T, d] whose rows these are (every expert on this rank): each token's k
        outputs weighted by weight [T, k] and summed (+ tokens.residual), [T, d] (`fp8.token_sums`: each token
        quantized once, its e4m3 row gathered; the backward's gradients quantized in the kernels that make them)."""
        if grouped is None:
            grouped = grouped_mm_available(x)
        offs = group_offsets(counts) if grouped and fp8_mm.kernel_available(x) else None
        q1, q2 = self._fp8_weights()
        return fp8_mm.token_sums(x, self.w1, self.w2, counts, offs, tokens.token_of_row, tokens.inverse, weight,
                                 tokens.k, q1, q2, tokens.residual)

    def _tokens(self, x, counts, grouped, row_weight, tokens: TokenRows) -> torch.Tensor:
        index, inverse, k, residual = tokens
        fused = grouped and row_weight is not None and not self.fp8  # the grouped products with weighted rows
        tokens_in_place = fused and _in_place(READ_TOKENS_IN_PLACE, self.ffn_hidden)
        gradient_in_place = fused and _in_place(READ_GRADIENT_IN_PLACE, self.ffn_hidden)
        if not (tokens_in_place or gradient_in_place):  # the rows gathered, run, summed
            rows = fused_permute.gather_tokens(x, index, inverse, k)
            return fused_permute.sum_tokens(self._rows(rows, counts, grouped, row_weight), index, inverse, k, residual)
        offs = group_offsets(counts)
        if tokens_in_place:
            h = grouped_gemm.gathered_linear(x, self.w1, offs, index, inverse, k)  # [N, 2F]
        else:
            h = grouped_gemm.linear(fused_permute.gather_tokens(x, index, inverse, k), self.w1, offs)
        if gradient_in_place:
            return fused_swiglu.swiglu_down_sum(h, row_weight, self.w2, offs, tokens)  # [T, d]
        out = fused_swiglu.swiglu_down(h, row_weight, self.w2, offs)
        return fused_permute.sum_tokens(out, index, inverse, k, residual)


def cache_fp8_weights(model: nn.Module) -> bool:
    """Quantize the weights of `model`'s FP8 experts and FP8 attention projections (`model.fp8_linear.Linear`)
    once, for the forwards and backwards until `release_fp8_weights` (an optimizer step's micro-batches: the
    weights do not change between them). Costs two bytes a parameter of theirs of device memory, kept
    between steps. Returns whether any."""
    found = False
    for m in model.modules():
        if isinstance(m, (SwiGLUExperts, FP8Linear)) and m.fp8:
            m.refresh_fp8_cache()
            found = True
    return found


def release_fp8_weights(model: nn.Module) -> None:
    """The cached forms stale from here (the optimizer is about to change the weights): quantize per call."""
    for m in model.modules():
        if isinstance(m, (SwiGLUExperts, FP8Linear)):
            m.fp8_cache_valid = False


class SwiGLU(nn.Module):
    """Dense SwiGLU FFN (the shared expert, and the dense model that sparse upcycling starts from)."""

    def __init__(self, d_model: int, ffn_hidden: int):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(d_model, 2 * ffn_hidden))  # [d, 2F] gate | up
        self.w2 = nn.Parameter(torch.empty(ffn_hidden, d_model))  # [F, d]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.w1).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w2
