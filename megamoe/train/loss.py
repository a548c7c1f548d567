"""The language-model loss, owned by the trainer: the model returns logits and its aux losses.

A micro-batch's LM loss is the sum of its targets' cross-entropies divided by a number the
trainer passes (torchtitan's `global_valid_tokens`): the step's target count over data
parallelism / (micro-batches × DP), so that every target of a step weighs the same whatever
the split into micro-batches and ranks. Under tensor parallelism the logits are vocab-local
and the sum is the vocab-parallel one, which never gathers the vocabulary.

Without tensor or pipeline parallelism the trainer asks the model for its final hidden states
and `linear_cross_entropy` projects them itself, chunk by chunk, computing the gradient in the
forward pass: the logits exist one chunk at a time and never in fp32 (at OLMoE's vocabulary
the fp32 logits and their gradient are 1.6 GB per 4096 tokens, and their softmax, casts and
copies cost more than the LM head's GEMMs).
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..parallel.state import ParallelState
from ..parallel.tensor import vocab_parallel_cross_entropy
from . import fused_cross_entropy

# (logits [..., V] or vocab-local [..., V/tp], labels [...]) -> Σ over labels != -100 (fp32)
CrossEntropy = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Σ over the targets (labels != -100) of the token cross-entropy, in fp32;
    logits [..., V], labels [...]."""
    return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=-100,
                           reduction="sum")


def _chunk_loss(logits: torch.Tensor, labels: torch.Tensor, with_grad: bool):
    """logits [n, V] (the head's dtype), labels [n] → Σ of the targets' cross-entropies in fp32,
    and with_grad: d loss / d logits [n, V] in the logits' dtype. Rows labelled -100 add nothing."""
    x = logits.float()
    valid = labels != -100
    target = labels.clamp(min=0).unsqueeze(1)  # [n, 1]
    logp = torch.log_softmax(x, dim=-1)  # [n, V]
    loss = (-logp.gather(1, target).squeeze(1) * valid).sum()
    if not with_grad:
        return loss, None
    grad = logp.exp().scatter_add(1, target, -torch.ones_like(target, dtype=logp.dtype)) * valid.unsqueeze(1)
    return loss, grad.to(logits.dtype)


def _chunk_fn(device: torch.device):
    """On CUDA the chunk's softmax, target pick and gradient are one Triton kernel
    (`fused_cross_entropy`: two reads of the logits, one write of their gradient); elsewhere torch."""
    if device.type == "cuda" and fused_cross_entropy.triton is not None:
        return fused_cross_entropy.chunk_loss
    return _chunk_loss


def _chunks(n: int, vocab: int) -> range:
    """Row starts: chunks whose logits take at most ~1 GiB in bf16."""
    return range(0, n, max(1, 2**29 // vocab))


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss, with both gradients computed chunk by chunk in the forward (kept for backward)."""

    @staticmethod
    def forward(ctx, h, weight, labels):
        chunk, starts = _chunk_fn(h.device), _chunks(h.shape[0], weight.shape[0])
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        # one chunk: the weight's gradient is one GEMM, as unchunked; several: summed in fp32
        sum_dtype = torch.promote_types(weight.dtype, torch.float32)
        grad_w = None if len(starts) == 1 else torch.zeros_like(weight, dtype=sum_dtype)
        for s in starts:
            hc = h[s:s + starts.step]
            part, d = chunk(hc @ weight.t(), labels[s:s + starts.step], True)  # d: [n, V]
            loss += part
            grad_h[s:s + starts.step] = d @ weight
            if grad_w is None:
                grad_w = d.t() @ hc  # [V, d]
            else:
                grad_w += d.t() @ hc
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        # scaled in fp32, as autograd scales the fp32 logits' gradient before casting it (one pass each on CUDA)
        return (fused_cross_entropy.scaled(grad_h, grad_loss, grad_h.dtype),
                fused_cross_entropy.scaled(grad_w, grad_loss, ctx.weight_dtype), None)


def linear_cross_entropy(hidden: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ over the targets (labels != -100) of the cross-entropy of `hidden @ weight.T`, in fp32:
    what `cross_entropy(lm_head(hidden), labels)` computes, without the full logits.
    hidden [..., d] (after the final norm), labels [...], weight [V, d] (the LM head's)."""
    h, y = hidden.flatten(0, -2), labels.flatten()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h, weight, y)
    chunk, starts = _chunk_fn(h.device), _chunks(h.shape[0], weight.shape[0])  # evaluation: no gradient
    return sum(chunk(h[s:s + starts.step] @ weight.t(), y[s:s + starts.step], False)[0] for s in starts)


def cross_entropy_for(state: ParallelState) -> CrossEntropy:
    """The summed cross-entropy of this layout's logits: vocab-parallel under tensor parallelism."""
    if state.tp == 1:
        return cross_entropy
    return partial(vocab_parallel_cross_entropy, group=state.tp_group)
