"""One AdamW update of one parameter, fused: a Triton kernel on CUDA, torch ops elsewhere.

Both compute torch's AdamW (`torch.optim.AdamW`, single-tensor form), with the gradient first
multiplied by `grad_scale` (the clipping factor), and only where `enabled` (a step the
divergence guard skips changes nothing):

    g = grad * grad_scale                       (in fp32)
    w = w * (1 - lr * weight_decay)
    m = m + (1 - beta1) * (g - m)               (torch's lerp)
    v = beta2 * v + (1 - beta2) * g * g
    w = w - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

`w` is the fp32 master weight when there is one (then the bf16 parameter receives w rounded to
nearest-even), else the fp32 parameter itself. The kernel moves the fewest bytes such an update
can: per element it reads the gradient (2 bytes in bf16), w, m and v (12) and writes w, m, v and
the parameter (14): 28 bytes, where the unfused sequence of torch ops moves several times that.
`grad_scale` and `enabled` may be device scalars, which the kernel reads itself: the optimizer
then decides clipping and skipping without the host reading the gradient norm first.
`tests/test_optimizer.py` holds the torch form to torch.optim.AdamW; the kernel is checked
against it on a GPU (`bench/bench_optimizer.py`).
"""

import math

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs: the torch form below is the only path
    triton = None


def adamw_step(p: torch.Tensor, grad: torch.Tensor, master: torch.Tensor | None, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, step: int, grad_scale: float | torch.Tensor = 1.0,
               enabled: torch.Tensor | None = None) -> None:
    """Update `p` (and `master`, `exp_avg`, `exp_avg_sq`) in place; `step` counts from 1.
    grad_scale: a number or an fp32 device scalar; enabled: None, or a device scalar whose zero
    leaves everything unchanged."""
    bc1, bc2_sqrt = 1 - beta1 ** step, math.sqrt(1 - beta2 ** step)
    if triton is not None and p.is_cuda and p.is_contiguous() and grad.is_contiguous():
        if not isinstance(grad_scale, torch.Tensor):
            grad_scale = torch.full((), grad_scale, dtype=torch.float32, device=p.device)
        if enabled is None:
            enabled = torch.ones((), dtype=torch.float32, device=p.device)
        _launch(p, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt,
                grad_scale, enabled)
        return
    if enabled is not None and not bool(enabled):
        return
    w = p if master is None else master
    g = grad.float() if grad.dtype != torch.float32 else grad
    if isinstance(grad_scale, torch.Tensor) or grad_scale != 1.0:
        g = g * grad_scale  # × 1.0 (a device scalar when not clipping) changes nothing
    w.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
    w.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if master is not None:
        p.copy_(master)


if triton is not None:
    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, w_ptr, m_ptr, v_ptr, n, beta1, beta2, eps, decay, step_size,
                      bc2_sqrt, scale_ptr, enabled_ptr, HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        limit = tl.where(tl.load(enabled_ptr) != 0, n, 0)  # a skipped step reads and writes nothing
        mask = offs < limit
        g = tl.load(g_ptr + offs, mask=mask).to(tl.float32) * tl.load(scale_ptr)
        w = tl.load(w_ptr + offs, mask=mask)
        m = tl.load(m_ptr + offs, mask=mask)
        v = tl.load(v_ptr + offs, mask=mask)
        w = w * decay
        m = m + (1 - beta1) * (g - m)
        v = beta2 * v + (1 - beta2) * (g * g)
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        w = w - step_size * tl.div_rn(m, denom)
        tl.store(w_ptr + offs, w, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
        if HAS_MASTER:
            tl.store(p_ptr + offs, w.to(p_ptr.dtype.element_ty), mask=mask)

    def _launch(p, grad, master, exp_avg, exp_avg_sq, lr, beta1, beta2, eps, weight_decay, bc1, bc2_sqrt,
                grad_scale: torch.Tensor, enabled: torch.Tensor):
        n, block = p.numel(), 4096
        w = p if master is None else master
        _adamw_kernel[(triton.cdiv(n, block),)](
            p, grad, w, exp_avg, exp_avg_sq, n, beta1, beta2, eps, 1 - lr * weight_decay, lr / bc1,
            bc2_sqrt, grad_scale, enabled, HAS_MASTER=master is not None, BLOCK=block, num_warps=8)
