"""Every use of DeepSpeed beyond its public API, in this one file.

Tested with DeepSpeed 0.19.8 (`TESTED_VERSION`, the version pyproject.toml pins). An upgrade, or
a swap of engine, checks the touch-points below; where one is gone, the run stops with
`DeepSpeedVersionError` naming the tested version instead of an AttributeError deep inside.

- `deepspeed.utils.groups._EXPERT_PARALLEL_GROUP`, `_EXPERT_DATA_PARALLEL_GROUP` (dicts by group
  name) and `groups.mpu` (`initialize`): our EP and expert-DP groups are handed to DeepSpeed, so
  that it reduces expert gradients over expert-DP and ZeRO partitions them there. DeepSpeed would
  otherwise build its own groups, in its rank order rather than `ParallelState`'s.
- A subclass of `deepspeed.moe.layer.MoE` that skips MoE's `__init__` (`mark_moe`): the engine
  treats a model as MoE only when it finds a module of that type. It reads the marker's
  `num_experts`, `ep_size`, `num_local_experts` and `expert_group_name`, and calls
  `set_deepspeed_parallelism()`, here a no-op because the groups are already registered.
- `engine.enable_backward_allreduce` (`initialize`): switched off when ZeRO 0 has no
  data-parallel replica. DeepSpeed would still flatten every gradient into buckets, convert them
  to fp32 and copy them back (22 ms a step on one H100, 8 layers).
- `optimizer._global_grad_norm` (`report_grad_norm`): the engine copies it from the client
  optimizer after each step for `get_global_grad_norm()`. Our ZeRO-0 AdamW reports through it.
- `param._hp_mapping` (`partitioned`): the fragment mapping of a parameter whose fp32 master and
  Adam moments live in the ZeRO 1/2 optimizer's flat partitions. Checkpoints read and write them
  through the public `deepspeed.utils.safe_get/set_full_*`.
- `optimizer._hp_optimizer_states_linked` and `._lazy_init_hp_params_optimizer_state()`
  (`link_fragments`): DeepSpeed links the fragments to the Adam moments once, after stepping
  only the first parameter group. Relinking when all states exist fills in the other groups.
- `MoE.deepspeed_moe.experts.deepspeed_experts` (and its `_modules`) and
  `MoE.deepspeed_moe.gate.wg` (`local_experts`, `renumber_experts`, `gate_weight`): the module
  tree inside DeepSpeed-MoE's layer, for `moe.backend: deepspeed`.

Public DeepSpeed API is used where it is needed: `deepspeed.initialize`, `init_distributed`,
`split_params_into_different_moe_groups_for_optimizer`, `safe_get/set_full_*`, the engine's
`backward`, `step`, `optimizer` and `get_global_grad_norm`, and the `overflow` flag it reads from
an optimizer.
The `mpu` getters (`Mpu`) are DeepSpeed's Megatron-style interface. They live here so that
`ParallelState` holds process groups only.
"""

import torch
import torch.distributed as dist
from torch import nn

TESTED_VERSION = "0.19.8"


class DeepSpeedVersionError(RuntimeError):
    """The installed DeepSpeed lacks a private name megamoe relies on."""


def _private(owner, name: str, where: str):
    """`owner.name`, private to DeepSpeed: a clear error when an upgrade removed it."""
    if not hasattr(owner, name):
        import deepspeed
        raise DeepSpeedVersionError(
            f"DeepSpeed {deepspeed.__version__} has no {where}.{name}, which megamoe relies on "
            f"(tested with DeepSpeed {TESTED_VERSION}): pip install deepspeed=={TESTED_VERSION}, "
            "or update megamoe/deepspeed_adapter.py")
    return getattr(owner, name)


class Mpu:
    """DeepSpeed's `mpu` interface (Megatron's getters) over a `ParallelState`."""

    def __init__(self, state):
        self.state = state

    def get_data_parallel_group(self):
        return self.state.dp_group or dist.group.WORLD

    def get_data_parallel_rank(self):
        return self.state.dp_rank

    def get_data_parallel_world_size(self):
        return self.state.dp

    def get_model_parallel_group(self):
        return self.state.mp_group

    def get_model_parallel_rank(self):
        return self.state.pp_rank * self.state.tp + self.state.tp_rank

    def get_model_parallel_world_size(self):
        return self.state.tp * self.state.pp

    def get_tensor_model_parallel_group(self):
        return self.state.tp_group

    def get_tensor_model_parallel_rank(self):
        return self.state.tp_rank

    def get_tensor_model_parallel_world_size(self):
        return self.state.tp

    def get_pipeline_model_parallel_group(self):
        return self.state.pp_group

    def get_pipeline_model_parallel_rank(self):
        return self.state.pp_rank

    def get_pipeline_model_parallel_world_size(self):
        return self.state.pp


def expert_group_name(ep: int) -> str:
    """DeepSpeed-MoE's name for the expert groups of `ep` ranks (expert params' `group_name`)."""
    return f"ep_size_{ep}"


def _register_expert_groups(state, mpu: Mpu) -> None:
    """Hand DeepSpeed our expert groups, so that ZeRO reduces expert gradients over expert-DP only."""
    from deepspeed.utils import groups
    where, name = "deepspeed.utils.groups", expert_group_name(state.ep)
    _private(groups, "_EXPERT_PARALLEL_GROUP", where)[name] = state.ep_group or dist.group.WORLD
    _private(groups, "_EXPERT_DATA_PARALLEL_GROUP", where)[name] = state.edp_group or dist.group.WORLD
    _private(groups, "mpu", where)
    groups.mpu = mpu


def mark_moe(model: nn.Module, num_experts: int, ep: int) -> None:
    """Attach a parameter-free module of DeepSpeed-MoE's type to `model`. DeepSpeed reduces expert
    parameters over expert-DP, and ZeRO partitions them there, only when it finds one."""
    from deepspeed.moe.layer import MoE
    _private(MoE, "set_deepspeed_parallelism", "deepspeed.moe.layer.MoE")

    class _ExpertGroupMarker(MoE):
        def __init__(self):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep
            self.num_local_experts = num_experts // ep
            self.expert_group_name = expert_group_name(ep)

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # `initialize` registers our groups

        def forward(self, *args):
            raise RuntimeError("marker module only")

    model.deepspeed_moe_marker = _ExpertGroupMarker()


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, state, config: dict,
               allreduce_gradients: bool = True):
    """`deepspeed.initialize` over our model, optimizer and process groups; returns the engine.

    allreduce_gradients False: the engine leaves gradients as they are after backward (ZeRO 0
    with one data-parallel rank)."""
    import deepspeed

    mpu = Mpu(state) if state.world_size > 1 else None
    if state.ep > 1:
        _register_expert_groups(state, mpu)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, mpu=mpu, config=config)
    if not allreduce_gradients:
        _private(engine, "enable_backward_allreduce", "DeepSpeedEngine")
        engine.enable_backward_allreduce = False
    if config["zero_optimization"]["stage"] > 0:
        _check_partitioned(engine.optimizer, model)
    return engine


def _check_partitioned(optimizer, model: nn.Module) -> None:
    """What checkpoints use of the ZeRO 1/2 optimizer exists, checked once at startup."""
    where = type(optimizer).__name__
    _private(optimizer, "_hp_optimizer_states_linked", where)
    _private(optimizer, "_lazy_init_hp_params_optimizer_state", where)
    for p in model.parameters():
        if p.requires_grad:
            _private(p, "_hp_mapping", f"a parameter under {where}")


def report_grad_norm(optimizer: torch.optim.Optimizer, norm: float | None) -> None:
    """Where the engine's `get_global_grad_norm()` reads a client optimizer's gradient norm."""
    optimizer._global_grad_norm = norm


def partitioned(p: torch.Tensor) -> bool:
    """Whether the fp32 master and Adam moments of `p` live in ZeRO 1/2's flat partitions."""
    return hasattr(p, "_hp_mapping")


def link_fragments(optimizer) -> None:
    """Point every parameter's fragment at its group's flat Adam moments (a partitioned
    optimizer's; other optimizers keep their state per parameter and need nothing).

    DeepSpeed links them once, after stepping only the *first* parameter group, so the other
    groups' fragments stay empty; relinking when all states exist fixes that.
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def local_experts(layer: nn.Module) -> nn.ModuleList:
    """The experts a `deepspeed.moe.layer.MoE` holds on this rank, one module each, in order."""
    return layer.deepspeed_moe.experts.deepspeed_experts


def renumber_experts(layer: nn.Module, first: int) -> None:
    """Key the local experts of a `deepspeed.moe.layer.MoE` by their global index (first,
    first + 1, ...), so every EP layout keeps the 1-rank model's parameter names."""
    experts = local_experts(layer)
    experts._modules = {str(first + i): m for i, m in enumerate(experts._modules.values())}


def gate_weight(layer: nn.Module) -> torch.Tensor:
    """The router weight [E, d] of a `deepspeed.moe.layer.MoE` (its TopKGate's `wg`)."""
    return layer.deepspeed_moe.gate.wg.weight
