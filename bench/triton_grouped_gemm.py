"""An experiment, not used by the trainer: expert GEMMs as Triton kernels that read the tokens
where they are (gathered operand loads). `bench_grouped_gemm.py --ours` times them against
`torch._grouped_mm`; on an H100 they were slower (docs/performance.md, session 8), so dispatch
keeps its gather kernel. (The experts' products now run through `megamoe/moe/grouped_gemm.py`'s TMA
kernels, session 9: TMA loads cannot gather rows on Hopper.)

    launch_rows_mm(a, b, offs, index=None) out[r] = a[src(r)] @ b[e(r)]             [R, N]
    launch_weight_grad_mm(a, b, offs, ia, ib)out[e] = Σ_{r in e} a[src_a(r)]ᵀ b[src_b(r)]  [E, M, N]

`offs` [E] int32 holds each expert's end row (as `torch._grouped_mm`), src(r) = index[r] when an
index is given, r otherwise. With an index the kernels load a token's row straight from the
[T, d] activations, so dispatch need not write the [R, d] permuted copy (R = T·k rows: 268 MB a
layer at OLMoE-1B-7B's 8,192 tokens) nor read it back, and the forward keeps the tokens, not the
copy, for the weight gradient. Without an index they are grouped GEMMs like `torch._grouped_mm`.

`launch_rows_mm` runs one program per (row tile, column tile); a row tile belongs to one expert (each
expert's rows start a new tile), found from the cumulative tile counts, and the grid is sized by
the bound ⌈R / BM⌉ + E so that no count is read on the host. `launch_weight_grad_mm` runs one program
per (expert, tile of out[e]) and loops over that expert's rows. Both accumulate in fp32 and round
once to the output dtype. The benchmark checks each result against `torch._grouped_mm`
(relative error 0 in c0's records); under Triton's interpreter, in fp32, they agreed with a
per-expert torch loop to 1e-5 when this was written.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch forms
    triton = None

# (BM, BN, BK, warps, stages); bench_grouped_gemm.py --ours sweeps others
ROWS_CONFIG = (128, 256, 64, 8, 3)
WGRAD_CONFIG = (128, 256, 64, 8, 3)


def tile_ends(offs: torch.Tensor, block_m: int) -> torch.Tensor:
    """[E] int32: cumulative count of BM-row tiles up to each expert's end."""
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    return torch.cumsum((counts + block_m - 1) // block_m, 0).to(torch.int32)


if triton is not None:
    @triton.jit
    def _rows_mm_kernel(a_ptr, b_ptr, c_ptr, index_ptr, offs_ptr, tile_end_ptr, n_rows,
                        stride_am, stride_be, stride_bk, stride_bn,
                        N: tl.constexpr, K: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr,
                        GATHER: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BN)
        tm = pid // num_n
        tn = pid % num_n
        es = tl.arange(0, E_P2)
        ends = tl.load(tile_end_ptr + es, mask=es < E, other=2147483647)
        e = tl.sum((ends <= tm).to(tl.int32))
        if e < E:
            gend = tl.load(offs_ptr + es, mask=es < E, other=0)
            tile0 = tl.sum(tl.where(es == e - 1, ends, 0))
            row_start = tl.sum(tl.where(es == e - 1, gend, 0))
            row_end = tl.sum(tl.where(es == e, gend, 0))
            rows = row_start + (tm - tile0) * BM + tl.arange(0, BM)
            # rows past the expert's end load a valid row (clamped) and are not stored
            safe = tl.minimum(rows, n_rows - 1)
            if GATHER:
                src = tl.load(index_ptr + safe).to(tl.int64)
            else:
                src = safe.to(tl.int64)
            cols = tn * BN + tl.arange(0, BN)
            ks = tl.arange(0, BK)
            a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :]
            b_ptrs = b_ptr + e.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
            acc = tl.zeros([BM, BN], dtype=tl.float32)
            for _ in range(0, K, BK):
                acc = tl.dot(tl.load(a_ptrs), tl.load(b_ptrs), acc)
                a_ptrs += BK
                b_ptrs += BK * stride_bk
            c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * N + cols[None, :]
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(rows < row_end)[:, None])

    @triton.jit
    def _weight_grad_kernel(a_ptr, b_ptr, c_ptr, index_a_ptr, index_b_ptr, offs_ptr, M, N,
                            stride_a, stride_b,
                            E: tl.constexpr, E_P2: tl.constexpr, GATHER_A: tl.constexpr, GATHER_B: tl.constexpr,
                            BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BM)
        num_n = tl.cdiv(N, BN)
        e = pid // (num_m * num_n)
        t = pid % (num_m * num_n)
        tm = t // num_n
        tn = t % num_n
        es = tl.arange(0, E_P2)
        gend = tl.load(offs_ptr + es, mask=es < E, other=0)
        row_start = tl.sum(tl.where(es == e - 1, gend, 0))
        row_end = tl.sum(tl.where(es == e, gend, 0))
        ms = tm * BM + tl.arange(0, BM)
        ns = tn * BN + tl.arange(0, BN)
        acc = tl.zeros([BM, BN], dtype=tl.float32)
        for r0 in range(row_start, row_end, BK):
            rows = r0 + tl.arange(0, BK)
            ok = rows < row_end
            if GATHER_A:
                ra = tl.load(index_a_ptr + rows, mask=ok, other=0).to(tl.int64)
            else:
                ra = rows.to(tl.int64)
            if GATHER_B:
                rb = tl.load(index_b_ptr + rows, mask=ok, other=0).to(tl.int64)
            else:
                rb = rows.to(tl.int64)
            at = tl.load(a_ptr + ra[:, None] * stride_a + ms[None, :], mask=ok[:, None], other=0.0)  # [BK, BM]
            b = tl.load(b_ptr + rb[:, None] * stride_b + ns[None, :], mask=ok[:, None], other=0.0)  # [BK, BN]
            acc = tl.dot(tl.trans(at), b, acc)
        c_ptrs = c_ptr + e.to(tl.int64) * M * N + ms[:, None] * N + ns[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty))

    def launch_rows_mm(a, b, offs, index=None, config=None, wrap=lambda kernel: kernel):
        """a [T, K] (rows a[index], or a itself), b [E, K, N] (any strides), offs [E] → [R, N]."""
        bm, bn, bk, warps, stages = config or ROWS_CONFIG
        a = a.contiguous()
        n_rows = index.numel() if index is not None else a.shape[0]
        E, K, N = b.shape
        assert K % bk == 0 and N % bn == 0, (K, N, bk, bn)
        out = a.new_empty(n_rows, N)
        if n_rows:
            ends = tile_ends(offs, bm)
            grid = ((triton.cdiv(n_rows, bm) + E) * (N // bn),)
            wrap(_rows_mm_kernel)[grid](
                a, b, out, index if index is not None else offs, offs, ends, n_rows,
                a.stride(0), b.stride(0), b.stride(1), b.stride(2),
                N=N, K=K, E=E, E_P2=triton.next_power_of_2(E), GATHER=index is not None,
                BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
        return out

    def launch_weight_grad_mm(a, b, offs, index_a=None, index_b=None, config=None, wrap=lambda kernel: kernel):
        """a [Ta, M], b [Tb, N] (rows gathered by index_a / index_b), offs [E] → [E, M, N]."""
        bm, bn, bk, warps, stages = config or WGRAD_CONFIG
        a, b = a.contiguous(), b.contiguous()
        M, N, E = a.shape[1], b.shape[1], offs.numel()
        assert M % bm == 0 and N % bn == 0, (M, N, bm, bn)
        out = a.new_empty(E, M, N)
        dummy = offs
        wrap(_weight_grad_kernel)[(E * (M // bm) * (N // bn),)](
            a, b, out, index_a if index_a is not None else dummy, index_b if index_b is not None else dummy,
            offs, M, N, a.stride(0), b.stride(0),
            E=E, E_P2=triton.next_power_of_2(E), GATHER_A=index_a is not None, GATHER_B=index_b is not None,
            BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)
        return out
