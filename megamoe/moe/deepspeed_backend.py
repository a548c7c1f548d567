"""`moe.backend: deepspeed`: DeepSpeed-MoE's own layer (`deepspeed.moe.layer.MoE`) as the FFN.

For users who want DeepSpeed-MoE itself: its `TopKGate`, its capacity-buffer dispatch and
all-to-all, its `Experts` (one SwiGLU module per local expert). `DeepSpeedMoE` adapts it to
`MoELayer`'s contract: forward(x [B, S, d]) -> (y, aux) with the detached statistics in
`self.stats`. Differences from the default backend, all DeepSpeed's:
  - top-k gating with k >= 3 renormalises the k weights (as `norm_topk_prob: true`);
  - aux = lb_loss_weight × DeepSpeed's l_aux, which is our Switch loss divided by k for k >= 3;
    the router z-loss is computed from the gate logits for the logs but is not trained;
  - capacity dropping keeps the highest-probability assignments (DeepSpeed's "probs" policy),
    not first choices first; no expert-choice routing and no shared experts;
  - parameter names (so checkpoints) differ; conversion to transformers needs the default backend.

Expert parallelism is applied afterwards, like the default backend's: the one
`megamoe.parallel.expert.apply_expert_parallel` calls `shard_experts`, which rebuilds the layer for
ep ranks and keys its local experts by their global index, so every layout keeps the 1-rank
model's parameter names (layout-independent init and checkpoints).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ..deepspeed_adapter import gate_weight, renumber_experts
from .experts import SwiGLU
from .router import z_loss


class DeepSpeedMoE(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, ffn_hidden: int,
                 capacity_factor: float | None = None, lb_loss_weight: float = 0.01):
        super().__init__()
        self.d_model, self.num_experts, self.top_k = d_model, num_experts, top_k
        self.ffn_hidden, self.capacity_factor, self.lb_loss_weight = ffn_hidden, capacity_factor, lb_loss_weight
        self.moe = self._build(ep_size=1)
        self.stats: dict[str, torch.Tensor] = {}

    def _build(self, ep_size: int) -> nn.Module:
        from deepspeed.moe.layer import MoE
        cf = self.capacity_factor
        # Deterministic gating: no random token selection (k=1), no sampled 2nd expert (k=2),
        # no noise; capacity as in our router (min 1 slot per expert).
        return MoE(self.d_model, SwiGLU(self.d_model, self.ffn_hidden), num_experts=self.num_experts,
                   ep_size=ep_size, k=self.top_k, capacity_factor=cf or 1.0, eval_capacity_factor=cf or 1.0,
                   min_capacity=1, noisy_gate_policy=None, drop_tokens=cf is not None, use_rts=False,
                   top2_2nd_expert_sampling=False)

    def shard_experts(self, ep_rank: int, ep_size: int) -> None:
        """Keep this EP rank's num_experts/ep_size experts, keyed by global expert index."""
        self.moe = self._build(ep_size)
        renumber_experts(self.moe, ep_rank * self.moe.num_local_experts)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, l_aux, exp_counts = self.moe(x)  # x, y: [B, S, d]; exp_counts: [E] top-k picks before dropping
        with torch.no_grad():  # the gate's logits are internal to TopKGate: recompute them for the z-loss
            logits = F.linear(x.reshape(-1, x.shape[-1]).float(), gate_weight(self.moe).float())
            self.stats = {"lb_loss": l_aux.detach().float(), "z_loss": z_loss(logits),
                          "expert_load": exp_counts.detach()}
        return y, self.lb_loss_weight * l_aux


def build_deepspeed_moe(d_model: int, moe) -> DeepSpeedMoE:
    """The Block FFN for `moe.backend: deepspeed` (`moe`: a MoEConfig; see the module docstring
    for what differs; `Config.validate` refuses the options it lacks)."""
    return DeepSpeedMoE(d_model, moe.num_experts, moe.top_k, moe.ffn_hidden, moe.capacity_factor,
                        moe.lb_loss_weight)
