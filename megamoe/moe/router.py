"""Routers: which experts see which tokens, with what weight, plus the auxiliary losses.

A router turns hidden states [T, d] into a flat list of assignments (token, expert, weight),
the one form that dispatch understands for every routing scheme:
  - token choice (OLMoE default): each token picks its top-k experts; dropless, or with a
    capacity factor that drops the assignments past each expert's capacity;
  - expert choice: each expert picks its top-C tokens (balanced by construction).

The Switch load-balancing loss E · Σ_i f_i · P_i counts the load fractions f_i over a scope
(`moe.lb_loss_scope`): this micro-batch (the OLMoE paper), each sequence (averaged), or the
micro-batch of every data-parallel rank at once (`lb_group`, set by
`megamoe.parallel.balance`): a larger sample of the batch, so the loss stops pushing each
small micro-batch towards uniform (Megatron-core's and OLMo-core's global-batch balancing).

Aux-loss-free balancing (DeepSeek-V3, `moe.bias_update_rate` > 0): a per-expert bias is added
to the probabilities for the top-k choice only (the combine weights stay the probabilities);
after each optimizer step `update_expert_bias` moves it by rate · sign(mean load − load_i), from
the step's loads summed over every rank, so it is the same on every rank. It is a persistent
fp32 buffer (bf16 engines cast parameters, and 1e-3 steps are below bf16's resolution), saved
in checkpoints under its canonical name `layers.N.ffn.router.expert_bias`.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    token_idx: torch.Tensor   # [N] which token each assignment moves
    expert_idx: torch.Tensor  # [N] to which expert
    weight: torch.Tensor      # [N] its combine weight
    lb_loss: torch.Tensor     # scalar, Switch-style load-balancing loss (0 for expert choice)
    z_loss: torch.Tensor      # scalar, mean logsumexp(logits)^2
    expert_load: torch.Tensor  # [E] assignments each expert received (detached; dispatch's group sizes)
    top_k: int = 0            # k when every token has exactly k assignments, token-major
    #                           (token_idx = arange(T).repeat_interleave(k)): dropless token choice


def load_balancing_loss(probs: torch.Tensor, topk_idx: torch.Tensor, num_experts: int,
                        num_sequences: int = 1, group=None) -> torch.Tensor:
    """E · Σ_i f_i · P_i with f_i = share of top-k picks to expert i (sums to k), P_i = mean prob.

    probs [T, E], topk_idx [T, k]. num_sequences B > 1: f and P per sequence (T = B·S tokens,
    sequence-major), the loss averaged over sequences. group: f counted over the tokens of every
    rank in it (each holding T); the gradient flows through this rank's P only."""
    T, B = probs.shape[0], num_sequences
    counts = expert_counts(topk_idx.reshape(B, -1), num_experts).float()  # [B, E]
    tokens = T // B
    if group is not None:
        dist.all_reduce(counts, group=group)  # on the model's device: fine for gloo and NCCL
        tokens *= dist.get_world_size(group)
    f = counts / tokens  # [B, E]
    P = probs.reshape(B, T // B, num_experts).mean(dim=1)  # [B, E]
    return num_experts * (f * P).sum(-1).mean()


def expert_counts(idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[..., E] int64: how often each expert occurs along idx's last dimension ([E] for [N] ids).

    A compare-and-sum, not a scatter_add of ones: no host sync (torch.bincount on CUDA reads the
    maximum back), no atomics (T·k atomic adds into E counters serialise: 117 µs a layer at
    262k assignments on an H100, docs/performance.md), exact and deterministic; under
    torch.compile it is one reduction kernel that never writes the [N, E] comparison."""
    experts = torch.arange(num_experts, device=idx.device, dtype=idx.dtype)
    return (idx.unsqueeze(-1) == experts).sum(-2)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """[T, E] → [T, k]: each row's k largest in descending order (ties: the lower index first), as
    k rounds of argmax and masking. Compiled on CUDA, inductor makes these one kernel that holds each
    row in registers (and fuses the softmax before it); aten's top-k there (`gatherTopK`) took 130 µs
    for the small model's [32,768 × 64] on an H100 (docs/performance.md). A row with fewer than k
    finite scores picks among the masked ones again (never the case for probabilities)."""
    cols = torch.arange(scores.shape[-1], device=scores.device)
    picks = []
    for _ in range(k):
        i = scores.argmax(-1, keepdim=True)  # [T, 1]
        picks.append(i)
        scores = torch.where(cols == i, float("-inf"), scores)
    return torch.cat(picks, -1)


def _top_k(scores: torch.Tensor, k: int, ranked: bool) -> torch.Tensor:
    """Indices of each row's top k: `top_k_indices` in compiled CUDA code (small k), torch.topk
    elsewhere (descending when `ranked`, else in any order)."""
    if torch.compiler.is_compiling() and scores.is_cuda and k <= 16:
        return top_k_indices(scores, k)
    return torch.topk(scores, k, dim=-1, sorted=ranked).indices


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of logsumexp(logits)^2, in fp32."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


class Router(nn.Module):
    """Linear(d, E) gate (in the model's dtype, or fp32: `router_dtype`) + softmax in fp32 + the
    configured selection rule. The combine weights take the logits' dtype."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, routing: str = "token_choice",
                 capacity_factor: float | None = None, norm_topk_prob: bool = False,
                 lb_loss_scope: str = "micro_batch", expert_bias: bool = False, router_dtype: str = "model"):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.routing, self.capacity_factor, self.norm_topk_prob = routing, capacity_factor, norm_topk_prob
        self.lb_loss_scope = lb_loss_scope
        self.fp32_logits = router_dtype == "fp32"  # else in the model's dtype (bf16 on GPU)
        self.lb_group = None  # global_batch: the data-parallel group (megamoe.parallel.balance)
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))  # [E, d]
        # [E] fp32, aux-loss-free balancing; None (not model state) when off
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)

    def capacity(self, num_tokens: int) -> int:
        """Assignments one expert may take: capacity_factor × its fair share of T·k."""
        factor = self.capacity_factor if self.capacity_factor is not None else 1.0
        return min(num_tokens, max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts)))

    def forward(self, x: torch.Tensor, num_sequences: int = 1) -> Routing:
        """x: [T, d], the tokens of `num_sequences` sequences, sequence-major."""
        if self.fp32_logits:
            logits = F.linear(x.float(), self.weight.float())  # [T, E]
        else:
            logits = F.linear(x, self.weight)  # [T, E]
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # [T, E]
        zl = z_loss(logits)
        if self.routing == "expert_choice":
            return self._expert_choice(logits, probs, zl)
        # a token's k picks in any order, except where capacity ranks first choices first
        ranked = self.capacity_factor is not None
        # the bias steers the choice, not the weights
        top_i = _top_k(probs if self.expert_bias is None else probs + self.expert_bias, self.top_k, ranked)  # [T, k]
        top_w = probs.gather(-1, top_i)
        if self.norm_topk_prob:
            top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        top_w = top_w.to(logits.dtype)
        lb = load_balancing_loss(probs, top_i, self.num_experts,
                                 num_sequences if self.lb_loss_scope == "sequence" else 1,
                                 self.lb_group if self.training else None)  # eval and sampling: local
        T = x.shape[0]
        token_idx = torch.arange(T, device=x.device).repeat_interleave(self.top_k)  # [T*k]
        expert_idx, weight = top_i.reshape(-1), top_w.reshape(-1)
        if self.capacity_factor is None:
            return Routing(token_idx, expert_idx, weight, lb, zl,
                           expert_counts(expert_idx, self.num_experts), top_k=self.top_k)
        keep = self._within_capacity(top_i, self.capacity(T))
        token_idx, expert_idx, weight = token_idx[keep], expert_idx[keep], weight[keep]
        return Routing(token_idx, expert_idx, weight, lb, zl, expert_counts(expert_idx, self.num_experts))

    def _within_capacity(self, top_i: torch.Tensor, capacity: int) -> torch.Tensor:
        """Mask [T*k] of assignments kept: first choices of all tokens fill experts first (GShard)."""
        T, k = top_i.shape
        slot_major = top_i.t().reshape(-1)  # [k*T]: every token's 1st choice, then 2nd, ...
        one_hot = F.one_hot(slot_major, self.num_experts)  # [k*T, E]
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # place in its expert's queue
        keep_slot_major = position < capacity
        return keep_slot_major.reshape(k, T).t().reshape(-1)  # back to token-major [T*k]

    def _expert_choice(self, logits, probs, zl) -> Routing:
        T = probs.shape[0]
        top_w, top_t = torch.topk(probs.t(), self.capacity(T), dim=-1)  # [E, C] tokens per expert
        expert_idx = torch.arange(self.num_experts, device=probs.device).repeat_interleave(top_t.shape[1])
        load = torch.full((self.num_experts,), top_t.shape[1], device=probs.device)
        zero = probs.new_zeros(())
        return Routing(top_t.reshape(-1), expert_idx, top_w.reshape(-1).to(logits.dtype), zero, zl, load)


@torch.no_grad()
def update_expert_bias(routers: dict[int, Router], load: torch.Tensor, rate: float,
                       taken: torch.Tensor | None = None) -> None:
    """Aux-loss-free step: bias_i += rate · sign(mean load − load_i) for every router, where
    `routers` maps each of this rank's routers to its row of `load` [MoE layers, E], the step's
    assignment counts summed over every rank (identical everywhere, so the biases stay so).
    `taken`: a device bool scalar, the step's update was taken (the biases stay as they are when
    not), for an update queued before the step's outcome is read."""
    for row, router in routers.items():
        step_load = load[row].to(torch.float64)
        delta = rate * torch.sign(step_load.mean() - step_load).to(router.expert_bias)
        router.expert_bias += delta if taken is None else torch.where(taken, delta, 0.0)
