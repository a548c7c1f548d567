"""Tensor parallelism (Megatron-style), optionally with sequence parallelism, applied to a plain OLMoE.

`apply_tensor_parallel(model, state, sequence_parallel)` converts the model in place:
  attention   q/k/v column-parallel (each TP rank keeps n_heads/tp whole heads), o_proj
              row-parallel; QK-norm stays an RMS over the whole q/k width (the sum of squares
              is all-reduced over TP), its weight cut like q/k.
  vocabulary  embedding vocab-parallel (rows V/tp); lm_head column-parallel, so logits are
              vocab-local [B, S, V/tp] and the model's loss becomes the vocab-parallel
              cross-entropy.
  MoE / FFN   router, experts, shared and dense FFNs are NOT split: every TP rank holds the
              same copy (same init, same gradients, same updates), as do the RMSNorms.
Without sequence parallelism everything outside attention and the vocabulary runs replicated
on [B, S, d], so the replicated parameters get complete, identical gradients on every rank.

With sequence parallelism the residual stream, the norms and the FFN run on this rank's
sequence chunk [B, S/tp, d]: all-gather before attention and lm_head, reduce-scatter after
o_proj and the embedding. The replicated parameters then see only their chunk's tokens; they
are marked `param.sequence_parallel = True` and a gradient hook sums their gradient over TP
during backward (no call needed after backward; it runs before ZeRO's hooks). Routing still
sees the whole sequence: the router input is all-gathered (the router is a [d, E] matmul,
cheap) so capacity, expert choice and the auxiliary losses are those of the 1-rank model; each
rank then dispatches only the assignments of its own chunk's tokens.

TP-cut parameters carry `tensor_model_parallel = True` and `partition_dim` (what DeepSpeed's
gradient-norm code looks for) and the `megamoe.sharding` marks (init, checkpoints).
"""

import dataclasses

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..model.attention import Attention
from ..model.fp8_linear import fp8_linear
from ..model.norm import RMSNorm
from ..moe.layer import MoELayer
from ..moe.router import Routing, expert_counts
from .mappings import (copy_to_tp, gather_from_sp, reduce_for_sharded, reduce_from_tp,
                       reduce_scatter_to_sp, sum_grad_over)
from ..sharding import full_shape, shard_parameter
from .state import ParallelState


def _cut(module: nn.Module, name: str, dim: int, state: ParallelState) -> None:
    """Keep this TP rank's chunk of module.<name> along dim, marked for init/checkpoints/DeepSpeed."""
    shard_parameter(module, name, dim, state.tp_rank, state.tp)
    param = getattr(module, name)
    param.tensor_model_parallel, param.partition_dim = True, dim


class _Region:
    """How activations enter and leave a tensor-parallel region, with or without SP."""

    def __init__(self, state: ParallelState, sequence_parallel: bool):
        self.group, self.sequence_parallel = state.tp_group, sequence_parallel

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """[B, S/tp or S, d] -> [B, S, d] on every rank (the grads flowing back are partial)."""
        return gather_from_sp(x, self.group) if self.sequence_parallel else copy_to_tp(x, self.group)

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """Partial sums [B, S, d] -> [B, S/tp or S, d]."""
        return reduce_scatter_to_sp(y, self.group) if self.sequence_parallel else reduce_from_tp(y, self.group)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ with W [out, in] cut along out: x [.., in] -> y [.., out/tp] (this rank's columns).

    `region` brings x into the TP region first; None when the caller already did (attention
    does it once for q, k and v).
    """

    def __init__(self, linear: nn.Linear, state: ParallelState, region: _Region | None):
        super().__init__()
        assert linear.bias is None, "megamoe's linears have no bias"
        self.weight, self.region = linear.weight, region
        self.fp8, self.group = getattr(linear, "fp8", False), state.tp_group
        _cut(self, "weight", 0, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.region is not None:
            x = self.region.enter(x)
        return fp8_linear(x, self.weight, out_group=self.group) if self.fp8 else F.linear(x, self.weight)


class RowParallelLinear(nn.Module):
    """y = Σ_ranks x_local W_localᵀ with W [out, in] cut along in: x [.., in/tp] -> y [.., out]
    (all-reduced; reduce-scattered to [B, S/tp, out] under SP)."""

    def __init__(self, linear: nn.Linear, state: ParallelState, region: _Region):
        super().__init__()
        assert linear.bias is None, "megamoe's linears have no bias"
        self.weight, self.region = linear.weight, region
        self.fp8, self.group = getattr(linear, "fp8", False), state.tp_group
        _cut(self, "weight", 1, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fp8_linear(x, self.weight, in_group=self.group) if self.fp8 else F.linear(x, self.weight)
        return self.region.leave(y)


class VocabParallelEmbedding(nn.Module):
    """Embedding with rows cut over TP: each rank looks up the tokens in its vocabulary range,
    zeros the rest, and the partial embeddings are summed (reduce-scattered under SP)."""

    def __init__(self, embedding: nn.Embedding, state: ParallelState, region: _Region):
        super().__init__()
        self.weight, self.region = embedding.weight, region
        _cut(self, "weight", 0, state)
        rows = self.weight.shape[0]
        self.vocab_start, self.vocab_end = state.tp_rank * rows, (state.tp_rank + 1) * rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, S] -> [B, S, d] (or [B, S/tp, d] under SP)."""
        outside = (tokens < self.vocab_start) | (tokens >= self.vocab_end)
        local = (tokens - self.vocab_start).masked_fill(outside, 0)
        h = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return self.region.leave(h)


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a width cut across TP: x [.., w/tp] normalised by the RMS of the whole w."""

    def __init__(self, norm: RMSNorm, state: ParallelState):
        super().__init__()
        self.eps, self.group = norm.eps, state.tp_group
        self.weight = norm.weight
        _cut(self, "weight", 0, state)
        self.width = full_shape(self.weight)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        sum_sq = reduce_for_sharded(xf.square().sum(-1, keepdim=True), self.group)  # [.., 1]
        y = xf * torch.rsqrt(sum_sq / self.width + self.eps)
        return self.weight * y.to(x.dtype)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy from vocab-local logits, without gathering the vocabulary."""

    @staticmethod
    def forward(ctx, logits, labels, group):
        """logits [N, V/tp] (this rank's vocab range), labels [N] -> loss [N] (fp32)."""
        ctx.dtype = logits.dtype
        logits = logits.float()
        rows = logits.shape[-1]
        start = dist.get_rank(group) * rows
        max_logit = logits.max(dim=-1).values  # [N]
        dist.all_reduce(max_logit, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - max_logit.unsqueeze(-1)  # [N, V/tp]
        local = labels - start
        mine = (local >= 0) & (local < rows)  # [N]: label in this rank's range (never for -100)
        local = local.masked_fill(~mine, 0)
        target = shifted.gather(-1, local.unsqueeze(-1)).squeeze(-1).masked_fill(~mine, 0.0)
        exp = shifted.exp()
        sums = torch.stack([target, exp.sum(-1)])  # [2, N]: target logit, Σ exp, both partial
        dist.all_reduce(sums, group=group)
        target, sum_exp = sums
        ctx.save_for_backward(exp.div_(sum_exp.unsqueeze(-1)), local, mine)
        return sum_exp.log() - target

    @staticmethod
    def backward(ctx, grad):
        softmax, local, mine = ctx.saved_tensors  # d loss_i / d logit_ij = softmax_ij - [j == label_i]
        g = softmax.clone()
        g.scatter_add_(-1, local.unsqueeze(-1), -mine.unsqueeze(-1).to(g.dtype))
        return (g * grad.unsqueeze(-1)).to(ctx.dtype), None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, group) -> torch.Tensor:
    """Σ over labels != -100 of the token cross-entropy (fp32); logits [..., V/tp] vocab-local,
    labels [...] global ids. Equal to `megamoe.train.loss.cross_entropy` of the gathered logits,
    without ever holding [N, V]."""
    labels = labels.flatten()
    losses = _VocabParallelCrossEntropy.apply(logits.flatten(0, -2), labels, group)  # [N]
    return (losses * (labels != -100)).sum()


class _WholeSequenceRouting:
    """Under SP, let a MoE layer's router see the whole sequence while the layer dispatches
    only this rank's chunk: forward hooks gather the router input and keep this chunk's
    assignments, renumbered to local token indices."""

    def __init__(self, moe: MoELayer, state: ParallelState):
        self.group, self.rank, self.tp = state.tp_group, state.tp_rank, state.tp
        self.chunk_shape = None
        moe.register_forward_pre_hook(self._remember_shape)
        moe.router.register_forward_pre_hook(self._gather_input)
        moe.router.register_forward_hook(self._keep_local)

    def _remember_shape(self, module, args):
        self.chunk_shape = args[0].shape  # [B, S/tp, d]

    def _gather_input(self, module, args):
        chunk = args[0].view(self.chunk_shape)  # [B*S/tp, d] -> [B, S/tp, d]
        return (gather_from_sp(chunk, self.group).flatten(0, 1),)  # [B*S, d], 1-rank token order

    def _keep_local(self, module, args, routing: Routing) -> Routing:
        seq_chunk = self.chunk_shape[1]
        seq = seq_chunk * self.tp
        batch, pos = routing.token_idx // seq, routing.token_idx % seq
        mine = pos // seq_chunk == self.rank  # [N]; keeps dropless top-k's token-major layout
        expert_idx = routing.expert_idx[mine]
        # Every rank adds the same whole-sequence aux losses; each backs 1/tp of their gradient,
        # and the reduce-scatter behind the gathered router input sums the shares.
        share = 1.0 / self.tp
        return dataclasses.replace(
            routing, token_idx=(batch * seq_chunk + pos % seq_chunk)[mine],
            expert_idx=expert_idx, weight=routing.weight[mine],
            expert_load=expert_counts(expert_idx, routing.expert_load.numel()),
            lb_loss=_scale_grad(routing.lb_loss, share), z_loss=_scale_grad(routing.z_loss, share))


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x in the forward pass; its gradient times `factor` in the backward pass."""
    return x.detach() + (x - x.detach()) * factor


def apply_tensor_parallel(model: nn.Module, state: ParallelState, sequence_parallel: bool) -> nn.Module:
    """Convert an OLMoE (or a pipeline stage of one) in place to tensor (+ sequence) parallelism
    over state.tp_group; see the module docstring. Apply before or after init_weights."""
    if state.tp == 1:
        assert not sequence_parallel, "sequence parallelism needs tensor parallelism"
        return model
    region = _Region(state, sequence_parallel)
    for attn in [m for m in model.modules() if isinstance(m, Attention)]:
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, ColumnParallelLinear(getattr(attn, name), state, region=None))
        attn.o_proj = RowParallelLinear(attn.o_proj, state, region)
        attn.q_norm, attn.k_norm = ParallelRMSNorm(attn.q_norm, state), ParallelRMSNorm(attn.k_norm, state)
        attn.register_forward_pre_hook(lambda module, args: (region.enter(args[0]),) + args[1:])
    if isinstance(getattr(model, "embed", None), nn.Embedding):
        model.embed = VocabParallelEmbedding(model.embed, state, region)
    if isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head = ColumnParallelLinear(model.lm_head, state, region)
    if sequence_parallel:
        for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
            _WholeSequenceRouting(moe, state)
        for param in model.parameters():
            if param.requires_grad and not getattr(param, "tensor_model_parallel", False):
                param.sequence_parallel = True
                sum_grad_over(param, state.tp_group)
    return model
