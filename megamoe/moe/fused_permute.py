"""The token permutations of dropless top-k dispatch as row-tiled Triton kernels on CUDA.

    gather_rows(src [T, d], index [N])    -> [N, d]   out[n] = src[index[n]]
    sum_rows(src [N, d], index [T, k])    -> [T, d]   out[t] = Σ_j src[index[t, j]]   (fp32 sum, src's dtype)
    sum_rows(src, index, residual [T, d]) -> [T, d]   residual[t] + that sum, rounded as the two steps would be
    sum_rows(src, index, residual, weight [T, k])     each row times weight[t, j] (fp32) before the sum

Dispatch runs each twice a layer (the tokens' gather to their experts and its gradient's sum; the
experts' sum back into tokens and its gradient's gather): at OLMoE-1B-7B's 8,192 tokens a layer,
each moves a [65,536 × 2,048] bf16 array. Inductor compiles them as flat pointwise kernels whose
element loads, behind a loaded row index, it cannot prove contiguous: 2-byte loads, ~0.17 ms a
call on an H100 where the bytes take ~0.09 (docs/performance.md). Here one program moves a tile
of whole rows: the row index is loaded once per row and each row is read in 16-byte vectors.
Exposed to torch.compile as `triton_op`s (no graph break). The sum adds the k rows in the order
j = 0..k-1 in fp32, as the compiled torch form `torch_sum_rows` does. Elsewhere (CPU, no
Triton) `gather_rows` and `sum_rows` are the torch forms; the kernels are checked against them under Triton's
interpreter on the CPU (tests/test_kernels.py). The residual form adds the block's residual stream
in the same pass (the sum rounded to src's dtype first, then added in fp32 and rounded: the bits of
the sum followed by the block's own `h + y`), which saves the block a kernel that read both [T, d]
arrays again (0.67 ms a step at OLMoE-1B-7B's micro-batch 2 on an H100, docs/performance.md session 14).
The weighted form is the FP8 experts' combine (`fp8.token_sums`, whose output rows are unweighted): the
compiled torch form's products and order (each row times its weight in fp32, summed in j's order): at
OLMoE-1B-7B's micro-batch 2 on an H100 its pass and the backward's sum took 3.64 ms a step where inductor's kernel
of that form and the sum took 3.74 (docs/performance.md, session 25: within the noise of the step's A/B).
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: dispatch uses the torch forms
    triton = None


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


# bench/bench_permute.py --sweep (H100, docs/performance.md): narrow tiles of many rows gather fastest
# (OLMoE's d 2048: 32 rows × 128 columns 115 µs, 4 × 1024 141, inductor's form 156; the small model's
# d 512: 128 against 157 µs); the sum times the same for every tile tried (115-121 µs).
TILE = {"elements": 4096, "max_columns": 128, "num_warps": 4}


def _blocks(d: int) -> tuple[int, int]:
    """(rows, columns) of a program's tile: TILE's elements, whole rows where d allows."""
    block_d = min(TILE["max_columns"], triton.next_power_of_2(d))
    return max(1, TILE["elements"] // block_d), block_d


if triton is not None:
    @triton.jit
    def _gather_kernel(src_ptr, index_ptr, out_ptr, n_rows, D: tl.constexpr, BLOCK_R: tl.constexpr,
                       BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        ok = (rows < n_rows)[:, None] & (cols < D)[None, :]
        src_rows = tl.load(index_ptr + rows, mask=rows < n_rows, other=0).to(tl.int64)
        v = tl.load(src_ptr + src_rows[:, None] * D + cols[None, :], mask=ok)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], v, mask=ok)

    @triton.jit
    def _sum_kernel(src_ptr, index_ptr, res_ptr, w_ptr, out_ptr, n_out, K: tl.constexpr, D: tl.constexpr,
                    RESIDUAL: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        row_ok = rows < n_out
        ok = row_ok[:, None] & (cols < D)[None, :]
        acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            src_rows = tl.load(index_ptr + rows * K + j, mask=row_ok, other=0).to(tl.int64)
            term = tl.load(src_ptr + src_rows[:, None] * D + cols[None, :], mask=ok, other=0.0).to(tl.float32)
            if WEIGHTED:
                term = term * tl.load(w_ptr + rows * K + j, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            acc += term
        out = acc.to(out_ptr.dtype.element_ty)
        if RESIDUAL:
            res = tl.load(res_ptr + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
            out = (res.to(tl.float32) + out.to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + rows[:, None] * D + cols[None, :], out, mask=ok)

    def launch_gather(src: torch.Tensor, index: torch.Tensor, wrap=lambda kernel: kernel) -> torch.Tensor:
        """`wrap` is torch.compile's `wrap_triton` under the custom op, the plain kernel otherwise."""
        src, index = src.contiguous(), index.contiguous()
        n, d = index.numel(), src.shape[1]
        out = src.new_empty(n, d)
        block_r, block_d = _blocks(d)
        if n:
            wrap(_gather_kernel)[(triton.cdiv(n, block_r), triton.cdiv(d, block_d))](
                src, index, out, n, d, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=TILE["num_warps"])
        return out

    def launch_sum(src: torch.Tensor, index: torch.Tensor, residual: torch.Tensor | None = None,
                   weight: torch.Tensor | None = None, wrap=lambda kernel: kernel) -> torch.Tensor:
        src, index = src.contiguous(), index.contiguous()
        if weight is not None:
            weight = weight.contiguous()
        (t, k), d = index.shape, src.shape[1]
        out = src.new_empty(t, d)
        block_r, block_d = _blocks(d)
        if residual is not None:
            residual = residual.reshape(t, d).contiguous()
        if t:
            wrap(_sum_kernel)[(triton.cdiv(t, block_r), triton.cdiv(d, block_d))](
                src, index, out if residual is None else residual, index if weight is None else weight, out, t, k, d,
                RESIDUAL=residual is not None, WEIGHTED=weight is not None, BLOCK_R=block_r, BLOCK_D=block_d,
                num_warps=TILE["num_warps"])
        return out

    @torch.library.triton_op("megamoe::gather_rows", mutates_args=())
    def _gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        return launch_gather(src, index, torch.library.wrap_triton)

    @torch.library.triton_op("megamoe::sum_rows", mutates_args=())
    def _sum_rows(src: torch.Tensor, index: torch.Tensor, residual: torch.Tensor | None = None,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
        return launch_sum(src, index, residual, weight, torch.library.wrap_triton)


def torch_sum_rows(src: torch.Tensor, index: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """out[t] = Σ_j weight[t, j] · src[index[t, j]] (weight 1 if None) in torch.
    src: [N, d]; index, weight: [T, k] → [T, d].

    Eager: one gather and a sum over k. Under torch.compile: k gathers added one by one in
    fp32, which inductor makes one pointwise kernel with k row loads; the sum over a middle
    dimension becomes a reduction kernel about 3× slower (H100, docs/performance.md)."""
    if not torch.compiler.is_compiling():
        rows = src[index]  # [T, k, d]
        if weight is not None:
            rows = rows * weight.unsqueeze(-1).to(rows.dtype)
        return rows.sum(1)
    acc_dtype = torch.promote_types(src.dtype, torch.float32)
    acc = None
    for j in range(index.shape[1]):
        term = src[index[:, j]].to(acc_dtype)
        if weight is not None:
            term = term * weight[:, j:j + 1].to(acc_dtype)
        acc = term if acc is None else acc + term
    return acc.to(src.dtype)


def gather_rows(src: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """src[index] for src [T, d] and index [N] (not differentiable: the autograd Functions below call it).
    On CUDA the kernel: compiled code calls the custom op (inductor launches the kernel from its own
    code); eager code launches the kernel itself, without the op's Python dispatch (~75 µs a call)."""
    if not available(src):
        return src[index]
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.gather_rows(src, index)
    return launch_gather(src, index)


def sum_rows(src: torch.Tensor, index: torch.Tensor, residual: torch.Tensor | None = None,
             weight: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j src[index[:, j]] (· weight[:, j] if given, [T, k]) for src [N, d] and index [T, k], summed in
    fp32 in j's order (torch's form elsewhere), rounded to src's dtype; with `residual` [T, d] (src's
    dtype) residual + that, added in fp32 and rounded (torch: after the sum's rounding)."""
    if not available(src):
        out = torch_sum_rows(src, index, weight)
        return out if residual is None else residual + out
    if torch.compiler.is_compiling():
        return torch.ops.megamoe.sum_rows(src, index, residual, weight)
    return launch_sum(src, index, residual, weight)


class _GatherTokens(torch.autograd.Function):
    """rows = x[token_of_row] when each token has exactly k rows; `inverse[t·k + j]` is the row
    holding token t's j-th copy. Backward sums each token's k row gradients."""

    @staticmethod
    def forward(ctx, x, token_of_row, inverse, k: int):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return gather_rows(x, token_of_row)  # [N, d]

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return sum_rows(grad, inverse.view(-1, ctx.k)), None, None, None


class _SumTokens(torch.autograd.Function):
    """y[t] = Σ_j out[inverse[t·k + j]] (+ residual[t]): each token's sum of its k (already weighted)
    expert outputs, the mirror of _GatherTokens. Backward hands each row its token's gradient."""

    @staticmethod
    def forward(ctx, out, token_of_row, inverse, k: int, residual=None):
        ctx.save_for_backward(token_of_row)
        return sum_rows(out, inverse.view(-1, k), residual)  # [T, d]

    @staticmethod
    def backward(ctx, grad):
        (token_of_row,) = ctx.saved_tensors
        return gather_rows(grad, token_of_row), None, None, None, grad if ctx.needs_input_grad[4] else None


def gather_tokens(x: torch.Tensor, token_of_row: torch.Tensor, inverse: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, d] → its rows [T·k, d] in expert order (row r is token token_of_row[r]), differentiable."""
    return _GatherTokens.apply(x, token_of_row, inverse, k)


def sum_tokens(out: torch.Tensor, token_of_row: torch.Tensor, inverse: torch.Tensor, k: int,
               residual: torch.Tensor | None = None) -> torch.Tensor:
    """The rows [T·k, d] → each token's sum of its k rows [T, d] (+ residual), differentiable."""
    return _SumTokens.apply(out, token_of_row, inverse, k, residual)
