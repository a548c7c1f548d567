"""Activation checkpointing: trade recomputation in the backward pass for activation memory.

  full       each Block keeps only its input; its whole forward (attention, routing, dispatch
             with its all-to-alls and TP collectives) runs again in the backward pass.
  selective  only the routed experts' SwiGLU is recomputed: the [tokens·k, 2F] gate/up
             intermediate is the largest activation of an MoE layer and the cheapest to redo
             (two GEMMs). The checkpoint sits inside dispatch, so no all-to-all is repeated.

Both wrap `forward` on the module instance rather than the module itself, so parameter names
(and thus checkpoints) do not change; both use non-reentrant `torch.utils.checkpoint`, which
works whatever the layout: the recomputation repeats the same collectives in the same order on
every rank of a group, because every rank of the group runs the same schedule.
"""

from torch import nn
from torch.utils.checkpoint import checkpoint

from ..model.olmoe import Block
from ..moe.experts import SwiGLUExperts


def _checkpoint_forward(module: nn.Module) -> None:
    inner = module.forward

    def forward(*args, **kwargs):
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    module.forward = forward


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoint every Block ("full") or every routed-experts SwiGLU ("selective"), in place."""
    kind = {"full": Block, "selective": SwiGLUExperts}[mode]
    for module in model.modules():
        if isinstance(module, kind):
            _checkpoint_forward(module)
    return model
