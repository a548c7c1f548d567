"""The loss chunk's cross-entropy and its logits gradient as one Triton kernel on CUDA.

    chunk_loss(logits [n, V], labels [n], with_grad) -> (Σ of the targets' cross-entropies (fp32),
                                                         d loss / d logits [n, V] in the logits' dtype)

`loss._chunk_loss` in torch: what the kernel computes, and what CPU runs use. Compiled by inductor
it took three passes over the chunk's bf16 logits and wrote the gradient twice: a reduction kernel
(online max and sum, then exp, the target's −1, written in fp32) and a pointwise one (fp32 read,
masked, bf16 written), 14 bytes an element; at OLMoE's vocabulary (50,304) that is 1.9 ms per 8,192
tokens on an H100 (docs/performance.md). Here one program owns a row: a first loop keeps a running
max and sum per lane, a second reads the row again (in L2 for the most part: a row is 100 KB) and
writes the gradient in the logits' dtype, 4-6 bytes an element from memory. Each row's loss is
written in fp32 and the rows are summed by torch. Rows labelled -100 add nothing and get a zero
gradient. Checked against the torch form under Triton's interpreter in CI
(tests/test_loss.py), on the GPU by the CUDA test there.

    scaled(x, s, dtype) -> (x.float() · s).to(dtype)    s: a 0-dim fp32 tensor on x's device

The loss's backward scales the gradients it computed in the forward by the incoming gradient (the
trainer's 1 / targets) in fp32. As three torch ops (`float()`, the product, the cast) the LM head's
[50,304 × 2,048] gradient was read and written three times in fp32, 0.9 ms a step on an H100 at
OLMoE's shapes (docs/performance.md, session 14); here one pass reads it and writes it once,
rounding the same fp32 product to the same dtype.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch form
    triton = None

BLOCK = 4096  # columns a program reads at a time (16 per thread at 8 warps)
NUM_WARPS = 8
SCALE_BLOCK = 8192  # elements a program of `scaled` moves
FUSED_SCALE = True  # False: `scaled` as torch's three passes on CUDA too (for A/B runs)


if triton is not None:
    @triton.jit
    def _cross_entropy_kernel(logits_ptr, labels_ptr, loss_ptr, grad_ptr, V, stride,
                              WITH_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride
        label = tl.load(labels_ptr + row)
        lanes = tl.arange(0, BLOCK_V)
        run_max = tl.full([BLOCK_V], float("-inf"), tl.float32)
        run_sum = tl.zeros([BLOCK_V], tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + lanes
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(run_max, x)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)  # a lane with no column yet
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(x - safe)
            run_max = new_max
        row_max = tl.max(run_max, axis=0)
        lse = row_max + tl.log(tl.sum(run_sum * tl.exp(run_max - row_max), axis=0))
        valid = label != -100
        target = tl.where(valid, label, 0)
        picked = tl.load(base + target).to(tl.float32)
        tl.store(loss_ptr + row, tl.where(valid, lse - picked, 0.0))
        if WITH_GRAD:
            g_base = grad_ptr + row * V
            scale = tl.where(valid, 1.0, 0.0)
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + lanes
                ok = cols < V
                x = tl.load(base + cols, mask=ok, other=0.0).to(tl.float32)
                g = tl.exp(x - lse) - tl.where(cols == target, 1.0, 0.0)
                tl.store(g_base + cols, (g * scale).to(grad_ptr.dtype.element_ty), mask=ok)

    def launch(logits: torch.Tensor, labels: torch.Tensor, with_grad: bool, wrap=lambda kernel: kernel):
        """(per-row losses [n] fp32, gradient [n, V] or None); `wrap` is torch.compile's
        `wrap_triton` under the custom op, the plain kernel otherwise."""
        n, v = logits.shape
        if logits.stride(1) != 1:
            logits = logits.contiguous()
        labels = labels.contiguous()
        losses = torch.empty(n, dtype=torch.float32, device=logits.device)
        grad = torch.empty(n, v, dtype=logits.dtype, device=logits.device) if with_grad else losses
        if n:
            wrap(_cross_entropy_kernel)[(n,)](logits, labels, losses, grad, v, logits.stride(0),
                                              WITH_GRAD=with_grad, BLOCK_V=min(BLOCK, triton.next_power_of_2(v)),
                                              num_warps=NUM_WARPS)
        return losses, (grad if with_grad else None)

    @triton.jit
    def _scale_kernel(x_ptr, s_ptr, out_ptr, n, BLOCK_N: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, (x * tl.load(s_ptr)).to(out_ptr.dtype.element_ty), mask=ok)

    def launch_scaled(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        x = x.contiguous()
        out = torch.empty(x.shape, dtype=dtype, device=x.device)
        if x.numel():
            _scale_kernel[(triton.cdiv(x.numel(), SCALE_BLOCK),)](x, s.float().reshape(1), out, x.numel(),
                                                                  BLOCK_N=SCALE_BLOCK, num_warps=8)
        return out

    @torch.library.triton_op("megamoe::cross_entropy_rows", mutates_args=())
    def _cross_entropy_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return launch(logits, labels, True, torch.library.wrap_triton)


def chunk_loss(logits: torch.Tensor, labels: torch.Tensor, with_grad: bool):
    """`loss._chunk_loss` by the kernel: (Σ of the rows' losses in fp32, gradient or None)."""
    if torch.compiler.is_compiling():
        losses, grad = torch.ops.megamoe.cross_entropy_rows(logits, labels)
        return losses.sum(), (grad if with_grad else None)
    losses, grad = launch(logits, labels, with_grad)
    return losses.sum(), grad


def scaled(x: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(x.float() * s).to(dtype) for a 0-dim s: one kernel on CUDA (eager code: the loss's backward),
    the torch form elsewhere and under torch.compile (which fuses it itself)."""
    if FUSED_SCALE and triton is not None and x.is_cuda and not torch.compiler.is_compiling():
        return launch_scaled(x, s, dtype)
    return (x.float() * s).to(dtype)
