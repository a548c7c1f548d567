"""The MoE FFN: router → dispatch → experts (+ optional shared experts)."""

import torch
from torch import nn

from .dispatch import Dispatcher
from .experts import SwiGLU, SwiGLUExperts
from .router import Router


class MoELayer(nn.Module):
    """Drop-in FFN for a transformer block. forward(x [B, S, d]) -> (y [B, S, d], aux_loss).

    aux_loss = lb_weight · load-balancing loss + z_weight · router z-loss of this layer.
    The detached per-layer statistics of the last forward stay in `self.stats` for logging.
    """

    def __init__(self, d_model: int, num_experts: int, top_k: int, ffn_hidden: int,
                 routing: str = "token_choice", capacity_factor: float | None = None,
                 norm_topk_prob: bool = False, num_shared_experts: int = 0,
                 lb_loss_weight: float = 0.01, z_loss_weight: float = 0.001, lb_loss_scope: str = "micro_batch",
                 expert_bias: bool = False, router_dtype: str = "model", expert_precision: str = "model"):
        super().__init__()
        self.router = Router(d_model, num_experts, top_k, routing, capacity_factor, norm_topk_prob,
                             lb_loss_scope, expert_bias, router_dtype)
        self.experts = SwiGLUExperts(num_experts, d_model, ffn_hidden, fp8=expert_precision == "fp8")
        self.shared = SwiGLU(d_model, ffn_hidden * num_shared_experts) if num_shared_experts else None
        self.dispatcher = Dispatcher(num_experts)
        self.lb_loss_weight, self.z_loss_weight = lb_loss_weight, z_loss_weight
        self.stats: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """residual [B, S, d]: returned as residual + y (the block's residual add; without shared
        experts the dispatcher's last pass adds it)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [T, d]
        routing = self.router(x, num_sequences=shape[0])
        residual = residual.reshape(x.shape) if residual is not None else None
        y = self.dispatcher.run(x, routing, self.experts, residual if self.shared is None else None)
        if self.shared is not None:
            y = y + self.shared(x)
            if residual is not None:
                y = residual + y
        self.stats = {"lb_loss": routing.lb_loss.detach(), "z_loss": routing.z_loss.detach(),
                      "expert_load": routing.expert_load}
        aux = self.lb_loss_weight * routing.lb_loss + self.z_loss_weight * routing.z_loss
        return y.reshape(shape), aux
