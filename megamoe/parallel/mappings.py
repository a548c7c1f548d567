"""Conjugate communication ops for tensor and sequence parallelism (after Megatron-core).

Each op is a collective forward paired with its adjoint backward, so that autograd through
a tensor-parallel region gives every rank the gradient of the one (replicated) loss:

    op                    forward                       backward
    copy_to_tp            identity                      all-reduce
    reduce_from_tp        all-reduce                    identity
    reduce_for_sharded    all-reduce                    all-reduce
    scatter_to_tp         split last dim                all-gather last dim
    gather_from_tp        all-gather last dim           split last dim
    scatter_to_sp         split sequence dim            all-gather sequence dim
    gather_from_sp        all-gather sequence dim       reduce-scatter sequence dim
    reduce_scatter_to_sp  reduce-scatter sequence dim   all-gather sequence dim

Activations are [B, S, ...], so the sequence dim is 1. Every op is the identity on a group of
one rank. Collectives never write into their input (autograd may share a gradient tensor
between branches). Works with gloo (CPU) and NCCL.
"""

from functools import partial

import torch
import torch.distributed as dist

SEQ_DIM = 1  # activations are [B, S, d]

# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names still work,
# with a FutureWarning); clusters with an older torch build have only the old names.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Collectives along one dimension: (x, dim, group) -> tensor -----------------------------

def _identity(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    return x


def _all_reduce(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum of x over the group, in a fresh tensor."""
    out = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(out, group=group)
    return out


def _split(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's equal chunk of x along dim."""
    size = dist.get_world_size(group)
    assert x.shape[dim] % size == 0, f"dim {dim} of {tuple(x.shape)} does not split over {size} ranks"
    return x.chunk(size, dim)[dist.get_rank(group)].contiguous()


def _all_gather(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's x concatenated along dim, in rank order."""
    size = dist.get_world_size(group)
    out = x.new_empty((size * x.shape[0],) + tuple(x.shape[1:]))  # ranks' x stacked along dim 0
    _all_gather_single(out, x.contiguous(), group=group)
    return torch.cat(out.chunk(size), dim=dim)


def _reduce_scatter(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Sum of x over the group, keeping this rank's chunk along dim."""
    size = dist.get_world_size(group)
    assert x.shape[dim] % size == 0, f"dim {dim} of {tuple(x.shape)} does not split over {size} ranks"
    chunks = torch.cat(x.chunk(size, dim))  # the ranks' chunks stacked along dim 0
    out = x.new_empty((chunks.shape[0] // size,) + tuple(chunks.shape[1:]))
    _reduce_scatter_single(out, chunks, group=group)
    return out


class _Conjugate(torch.autograd.Function):
    """forward_op(x) in the forward pass, backward_op(grad) in the backward pass."""

    @staticmethod
    def forward(ctx, x, forward_op, backward_op, dim: int, group):
        ctx.backward_op, ctx.dim, ctx.group = backward_op, dim, group
        return forward_op(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return ctx.backward_op(grad, ctx.dim, ctx.group), None, None, None, None


def _conjugate(forward_op, backward_op, x: torch.Tensor, group, dim: int = -1) -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _Conjugate.apply(x, forward_op, backward_op, dim, group)


# Tensor parallel: x replicated on every rank, or its last dim split -------------------------

def copy_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Enter a TP region with a replicated input: the partial input grads are summed."""
    return _conjugate(_identity, _all_reduce, x, group)


def reduce_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Leave a TP region: sum the ranks' partial outputs into a replicated one."""
    return _conjugate(_all_reduce, _identity, x, group)


def reduce_for_sharded(x: torch.Tensor, group) -> torch.Tensor:
    """A sum over ranks that each rank then uses in its own sharded computation (e.g. the
    sum of squares of a norm over a split width), so its gradient is a sum over ranks too."""
    return _conjugate(_all_reduce, _all_reduce, x, group)


def scatter_to_tp(x: torch.Tensor, group) -> torch.Tensor:
    """Replicated [..., n] -> this rank's [..., n/tp]."""
    return _conjugate(_split, _all_gather, x, group, dim=-1)


def gather_from_tp(x: torch.Tensor, group) -> torch.Tensor:
    """This rank's [..., n/tp] -> replicated [..., n]."""
    return _conjugate(_all_gather, _split, x, group, dim=-1)


# Sequence parallel: [B, S/tp, d] chunks outside the TP regions -------------------------------

def scatter_to_sp(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Replicated [B, S, d] -> this rank's [B, S/tp, d]."""
    return _conjugate(_split, _all_gather, x, group, dim)


def gather_from_sp(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """[B, S/tp, d] chunks -> the whole [B, S, d] on every rank, feeding rank-specific
    (tensor-parallel) work: each rank's grad is partial, so the backward reduce-scatters."""
    return _conjugate(_all_gather, _reduce_scatter, x, group, dim)


def reduce_scatter_to_sp(x: torch.Tensor, group, dim: int = SEQ_DIM) -> torch.Tensor:
    """Partial [B, S, d] from a row-parallel layer -> summed, this rank's [B, S/tp, d]."""
    return _conjugate(_reduce_scatter, _all_gather, x, group, dim)


# Gradients of replicated parameters that see only part of the data ---------------------------

def sum_grad_over(param: torch.Tensor, group) -> None:
    """Sum `param`'s gradient over `group` as autograd produces it, before it is accumulated
    into `.grad` (and so before DeepSpeed/ZeRO's reduction hooks, which run after)."""
    param.register_hook(partial(_all_reduce, dim=0, group=group))
