"""Expert parallelism: each EP rank keeps num_experts/ep experts of every MoE layer.

Tokens reach the other experts through the dispatcher's all-to-all over state.ep_group
(`megamoe.moe.dispatch`). Expert parameters carry DeepSpeed-MoE's markers, `allreduce =
False` and `group_name`, so DeepSpeed (and `split_params_into_different_moe_groups_for_optimizer`)
reduces their gradients over expert-data-parallel ranks only; dense parameters over DP.
`moe.backend: deepspeed` layers are rebuilt for ep ranks by DeepSpeed-MoE itself, which marks
their experts the same way.
"""

from torch import nn

from ..deepspeed_adapter import expert_group_name
from ..moe.deepspeed_backend import DeepSpeedMoE
from ..moe.dispatch import Dispatcher
from ..moe.layer import MoELayer
from .mappings import sum_grad_over
from ..sharding import shard_parameter
from .state import ParallelState


def apply_expert_parallel(model: nn.Module, state: ParallelState) -> nn.Module:
    """Cut every MoE layer's stacked experts to this EP rank's share, in place, and mark the
    expert parameters for DeepSpeed (also with ep = 1, so one code path builds the groups).
    Order-free with `apply_tensor_parallel` and `init_weights`; DeepSpeed-MoE layers are rebuilt,
    so before `init_weights` for them."""
    for moe in [m for m in model.modules() if isinstance(m, MoELayer)]:
        num_experts = moe.dispatcher.num_experts
        assert num_experts % state.ep == 0, f"{num_experts} experts do not split over ep={state.ep}"
        if state.ep > 1:
            for name in ("w1", "w2"):  # [E, d, 2F], [E, F, d] -> [E/ep, ...]
                shard_parameter(moe.experts, name, 0, state.ep_rank, state.ep)
                if getattr(getattr(moe.experts, name), "sequence_parallel", False):
                    sum_grad_over(getattr(moe.experts, name), state.tp_group)  # the hook stayed on the old tensor
            moe.dispatcher = Dispatcher(num_experts, state.ep_group)
        for param in moe.experts.parameters():
            param.allreduce = False
            param.group_name = expert_group_name(state.ep)
    for layer in [m for m in model.modules() if isinstance(m, DeepSpeedMoE)]:
        layer.shard_experts(state.ep_rank, state.ep)  # DeepSpeed-MoE finds our groups by name
    return model
