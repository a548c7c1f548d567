"""Token dispatch: permute routed tokens to their experts (across EP ranks) and back.

Dropless expert parallelism, DeepSpeed-MoE / Megatron style but with variable splits:
  1. sort assignments by expert; gather their token rows          [N, d]
  2. exchange per-expert counts over the EP group (the one host sync: split sizes)
  3. all-to-all rows to the rank owning each expert               [N_recv, d]
  4. regroup received rows by local expert (they arrive by source rank)
  5. experts run; everything is undone in reverse; rows are scaled by their routing
     weight and summed back into their tokens. (Dropless top-k with every expert local
     scales the rows inside the experts instead, between SwiGLU and the second GEMM.)

No host sync on one rank: group sizes are the router's counts, kept on the device. For dropless
token choice (every token has exactly k rows) gathering and combining are permutations whose
gradients are gathers and sums over k: no atomics, no index_put. Other routings use index_add_.
"""

import torch
import torch.distributed as dist

from . import fused_permute, fused_sort
from .experts import TokenRows
from .router import Routing


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; its gradient is the reverse all-to-all."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad, in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def sort_keys(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Expert ids in the narrowest integer type that holds them: a radix sort makes one pass per
    key byte, so uint8 keys sort in 1 pass where int64 take 8 (same stable order)."""
    if num_experts <= 256:
        return expert_idx.to(torch.uint8)
    return expert_idx.to(torch.int16 if num_experts <= 2**15 else torch.int32)


class _CombineTokens(torch.autograd.Function):
    """y[t] = Σ_j weight[t, j] · out[inverse[t·k + j]]: each token's weighted sum of its k
    expert outputs. out: [N, d] sorted rows; weight: [T, k]; order = argsort, inverse its inverse."""

    @staticmethod
    def forward(ctx, out, weight, token_of_row, order, inverse):
        T, k = weight.shape
        ctx.save_for_backward(out, weight, token_of_row, order)
        return fused_permute.torch_sum_rows(out, inverse.view(T, k), weight)  # [T, d]

    @staticmethod
    def backward(ctx, grad):
        out, weight, token_of_row, order = ctx.saved_tensors
        grad_rows = grad[token_of_row]  # [N, d]: each row's token gradient
        w_rows = weight.reshape(-1)[order].unsqueeze(-1).to(grad.dtype)  # [N, 1]
        grad_w_rows = (grad_rows * out).sum(-1, dtype=torch.promote_types(out.dtype, torch.float32))  # [N]
        grad_w = torch.empty_like(grad_w_rows).scatter_(0, order, grad_w_rows)
        return grad_rows * w_rows, grad_w.view_as(weight).to(weight.dtype), None, None, None


class Dispatcher:
    """Moves routed rows to the experts that own them and brings results back.

    `ep_group` None (or of size 1) means every expert is local.
    """

    def __init__(self, num_experts: int, ep_group=None):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.num_local = num_experts // self.ep_size

    def run(self, x: torch.Tensor, routing: Routing, experts, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [T, d] → Σ_assignments weight · expert(x[token]) per token, [T, d]; plus `residual` [T, d]
        when given (added to the sum rounded to x's dtype: in the sum's own pass on dropless top-k)."""
        fused_sum = bool(routing.top_k) and self.ep_size == 1  # the sum's pass adds the residual
        plain_sum = fused_sum and not getattr(experts, "fp8", False)
        y = self._run(x, routing, experts, plain_sum, residual if fused_sum else None)
        return y if residual is None or fused_sum else residual + y

    def _run(self, x, routing, experts, plain_sum: bool, residual):
        """plain_sum: the routing weights scale the experts' activations and the combine is a plain
        sum (dropless top-k, no expert parallelism, no FP8), whose pass adds `residual`; FP8 experts'
        weighted sum adds it too (dropless top-k, no expert parallelism: `fp8_token_sums`)."""
        k = routing.top_k
        counts = routing.expert_load  # [E] rows per expert
        if k and fused_sort.available(routing.expert_idx) and self.num_experts <= fused_sort.MAX_EXPERTS:
            # the same three tensors from a two-kernel counting sort (no radix sort, gather, scatter)
            order, inverse, token_of_row = fused_sort.sort_by_expert(routing.expert_idx, counts, k)
        else:
            # [N] the assignment of each sorted row
            order = torch.argsort(sort_keys(routing.expert_idx, self.num_experts), stable=True)
            token_of_row = routing.token_idx[order]  # [N]
            if k:
                inverse = torch.empty_like(order).scatter_(
                    0, order, torch.arange(order.numel(), device=order.device))  # [N] row of each assignment
        if plain_sum:
            # The routing weight scales each row's SwiGLU activation, before the second GEMM, and
            # the combine is a plain sum: the experts' outputs [N, d] need not be kept for the
            # weights' gradient (268 MB a layer at OLMoE's 8,192 tokens) nor read again for it.
            # Not with FP8 experts: e4m3 would round the weighted activation differently from
            # the unweighted one that expert parallelism sends, and layouts must agree. The
            # experts take the tokens and return their sums: where their kernels run they read
            # token rows in place instead of a gathered copy (`experts.TokenRows`).
            tokens = TokenRows(token_of_row, inverse, k, residual)
            return experts(x, counts, row_weight=routing.weight[order], tokens=tokens).to(x.dtype)
        if k and self.ep_size == 1 and getattr(experts, "fp8", False):  # the experts and the weighted sum, one Function
            weight = routing.weight.view(-1, k)  # [T, k]
            return experts.fp8_token_sums(x, counts, TokenRows(token_of_row, inverse, k, residual), weight).to(x.dtype)
        if self.ep_size == 1:
            out = experts(fused_permute.gather_tokens(x, token_of_row, inverse, k) if k else x[token_of_row], counts)
        else:  # rows sorted by global expert; the weights stay on this rank and scale the rows when they come back
            rows = fused_permute.gather_tokens(x, token_of_row, inverse, k) if k else x[token_of_row]
            out = self._run_expert_parallel(rows, counts, experts)
        if k:
            weight = routing.weight.view(-1, k)  # [T, k]
            return _CombineTokens.apply(out, weight, token_of_row, order, inverse).to(x.dtype)
        out = out * routing.weight[order].unsqueeze(-1).to(out.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_row, out.to(x.dtype))

    def _run_expert_parallel(self, rows, counts, experts):
        send = counts.view(self.ep_size, self.num_local)  # [dest rank, local expert]
        recv = torch.empty_like(send)  # [source rank, local expert]
        dist.all_to_all_single(recv, send, group=self.ep_group)
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = all_to_all(rows, out_splits, in_splits, self.ep_group)  # [M, d] by source
        # Rows arrive grouped by source rank, then expert; the experts want them by expert.
        local_expert = torch.arange(self.num_local, device=rows.device).repeat(self.ep_size)
        by_expert = torch.argsort(sort_keys(torch.repeat_interleave(local_expert, recv.reshape(-1)), self.num_local),
                                  stable=True)
        out = torch.empty_like(received)
        out[by_expert] = experts(received[by_expert], recv.sum(0))
        return all_to_all(out, in_splits, out_splits, self.ep_group)
