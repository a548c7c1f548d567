"""Token dispatch: permute routed tokens to their experts (across EP ranks) and back.

Dropless expert parallelism, DeepSpeed-MoE / Megatron style but with variable splits:
  1. sort assignments by expert; gather their token rows          [N, d]
  2. exchange per-expert counts over the EP group (the one host sync: split sizes)
  3. all-to-all rows to the rank owning each expert               [N_recv, d]
  4. regroup received rows by local expert (they arrive by source rank)
  5. experts run; everything is undone in reverse; rows are scaled by their routing
     weight and summed back into their tokens with index_add_.
"""

import torch
import torch.distributed as dist

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


class Dispatcher:
    """Moves routed rows to the experts that own them and brings results back.

    `ep_group` None (or of size 1) means every expert is local.
    """

    def __init__(self, num_experts: int, ep_group=None):
        self.num_experts = num_experts
        self.ep_group = ep_group
        self.ep_size = dist.get_world_size(ep_group) if ep_group is not None else 1
        self.num_local = num_experts // self.ep_size

    def run(self, x: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
        """x: [T, d] → Σ_assignments weight · expert(x[token]) per token, [T, d]."""
        order = torch.argsort(routing.expert_idx, stable=True)  # [N]
        token_of_row = routing.token_idx[order]
        rows = x[token_of_row]  # [N, d] sorted by global expert id
        counts = torch.bincount(routing.expert_idx, minlength=self.num_experts)  # [E]
        if self.ep_size == 1:
            out = experts(rows, counts)
        else:
            out = self._run_expert_parallel(rows, counts, experts)
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
        by_expert = torch.argsort(torch.repeat_interleave(local_expert, recv.reshape(-1)), stable=True)
        out = torch.empty_like(received)
        out[by_expert] = experts(received[by_expert], recv.sum(0))
        return all_to_all(out, in_splits, out_splits, self.ep_group)
