"""Build the model for this rank's layout and wrap it in the DeepSpeed engine.

Order, torchtitan style: plain model → pipeline stage → tensor parallel → expert parallel →
init weights (layout-independent) → activation checkpointing → `deepspeed.initialize` with
MoE-aware parameter groups. The LR schedule is a pure function of the step (`lr_at`), so resuming
needs no scheduler state.
"""

import math
import os

import torch
from torch import nn

from ..config import Config
from ..model.olmoe import OLMoE, init_weights
from ..parallel.state import ParallelState

if not torch.cuda.is_available():  # must be set before deepspeed is imported anywhere
    os.environ.setdefault("DS_ACCELERATOR", "cpu")


def resolve_device(cfg: Config) -> torch.device:
    if cfg.train.device == "cuda" or (cfg.train.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from ..config import ConfigError
            raise ConfigError("train.device: cuda was asked for but no GPU is visible; "
                              "set train.device=cpu")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_dtype(cfg: Config, device: torch.device) -> torch.dtype:
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if precision == "bf16" else torch.float32


def build_model(cfg: Config, state: ParallelState) -> OLMoE:
    """The plain model, cut to this rank's layout and initialised like the 1-rank model."""
    model = OLMoE(cfg)
    if state.pp > 1:
        from ..parallel.pipeline import apply_pipeline
        apply_pipeline(model, state, cfg.parallel.pipeline_layers)
    if state.tp > 1:
        from ..parallel.tensor import apply_tensor_parallel
        apply_tensor_parallel(model, state, cfg.parallel.sequence_parallel)
    if state.ep > 1:
        from ..parallel.expert import apply_expert_parallel
        apply_expert_parallel(model, state)
        if cfg.moe.backend == "deepspeed":
            from ..moe import deepspeed_backend
            deepspeed_backend.apply_expert_parallel(model, state)
    if cfg.moe.lb_loss_scope == "global_batch" and state.dp > 1:
        from ..parallel.balance import apply_global_load_balancing
        apply_global_load_balancing(model, state)
    init_weights(model, cfg.model.init_std, cfg.train.seed)
    if cfg.parallel.activation_checkpointing != "none":
        from ..parallel.checkpointing import apply_activation_checkpointing
        apply_activation_checkpointing(model, cfg.parallel.activation_checkpointing)
    if cfg.train.compile:
        if resolve_device(cfg).type == "cuda":
            from ..model.compile import apply_compile
            apply_compile(model)
        elif state.rank == 0:
            print("megamoe: train.compile is for CUDA; running eager on CPU", flush=True)
    return model


def lr_at(cfg: Config, step: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine/WSD/constant."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return o.lr * (step + 1) / o.warmup_steps
    floor = o.lr * o.min_lr_ratio
    if o.schedule == "constant":
        return o.lr
    if o.schedule == "cosine":
        progress = (step - o.warmup_steps) / max(1, total - o.warmup_steps)
        return floor + (o.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    decay_start = total - int(o.decay_fraction * total)  # wsd: warmup, stable, linear decay
    if step < decay_start:
        return o.lr
    return o.lr - (o.lr - floor) * (step - decay_start + 1) / max(1, total - decay_start)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices, not norms/1-D params; then split expert params into DeepSpeed MoE groups."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"name": "decay", "params": decay, "weight_decay": weight_decay},
              {"name": "no_decay", "params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for p in model.parameters()):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    return groups


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """apex FusedAdam when NVIDIA apex is installed (GPU), else torch AdamW (fused on GPU)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def deepspeed_config(cfg: Config, state: ParallelState, dtype: torch.dtype) -> dict:
    """DeepSpeed's config for this run.

    bf16 runs through DeepSpeed's ZeRO optimizer (fp32 master weights and Adam moments, kept
    per parameter by its fragment mapping, which checkpoints read). Its ZeRO-0 bf16 path keeps
    neither in a form we can checkpoint per parameter, so `zero_stage: 0` runs as ZeRO-1 in bf16:
    on one data-parallel rank that is the same thing, on several it also shards the optimizer
    state. (tests/test_train.py: bf16 on 1 rank, EP2 and PP2 agree with the fp32 run.)
    """
    t = cfg.train
    bf16 = dtype == torch.bfloat16
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(state.world_size),
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": max(cfg.parallel.zero_stage, 1) if bf16 else cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def _mark_moe_for_deepspeed(model: nn.Module, state: ParallelState) -> None:
    """DeepSpeed handles expert params (EDP reduction, ZeRO partitioning) only when it finds a
    `deepspeed.moe.layer.MoE` module; our MoE layers are our own, so attach a parameter-free
    marker of that type carrying the expert-group name."""
    from deepspeed.moe.layer import MoE

    class _ExpertGroupMarker(MoE):
        def __init__(self, num_experts: int, ep_size: int):
            nn.Module.__init__(self)
            self.num_experts, self.ep_size = num_experts, ep_size
            self.num_local_experts = num_experts // ep_size
            self.expert_group_name = f"ep_size_{ep_size}"

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # our groups are registered by ParallelState.register_with_deepspeed

        def forward(self, *args):
            raise RuntimeError("marker module only")

    model.deepspeed_moe_marker = _ExpertGroupMarker(model.cfg.moe.num_experts, state.ep)


def build_engine(cfg: Config, state: ParallelState, model: nn.Module, device: torch.device):
    """deepspeed.initialize over our model, optimizer and process groups."""
    import deepspeed

    dtype = resolve_dtype(cfg, device)
    model.to(device)
    if state.ep > 1:
        state.register_with_deepspeed()
        if cfg.moe.backend != "deepspeed":  # DeepSpeed finds its own MoE modules
            _mark_moe_for_deepspeed(model, state)
    optimizer = build_optimizer(cfg, model, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           mpu=state if state.world_size > 1 else None,
                                           config=deepspeed_config(cfg, state, dtype))

    def clip_fp32_gradients():  # DeepSpeed's fp32/ZeRO-0 path: clip by the true global norm
        engine._global_grad_norm = clip_grad_norm(model, state, cfg.optim.grad_clip)

    engine.clip_fp32_gradients = clip_fp32_gradients
    return engine


def clip_grad_norm(model: nn.Module, state: ParallelState, max_norm: float) -> float:
    """Clip gradients by the norm of the *full* model's gradient, whatever the layout.

    Each distinct gradient element counts once: expert shards are summed over the EP group,
    tensor-parallel shards over the TP group, stages over the PP group; replicas count once.
    """
    from ..parallel import comm
    from ..parallel.sharding import shards

    params = [p for p in model.parameters() if p.grad is not None]
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros(3, dtype=torch.float64, device=device)  # replicated, tp-sharded, expert
    for p in params:  # summed on the device; read once, below
        kind = 2 if getattr(p, "allreduce", True) is False else (1 if shards(p) else 0)
        sq[kind] += p.grad.detach().double().pow(2).sum()
    if state.tp > 1:
        sq[1:2] = comm.all_reduce(sq[1:2], state.tp_group)
    if state.ep > 1:
        sq[2:3] = comm.all_reduce(sq[2:3], state.ep_group)
    total = sq.sum()
    if state.pp > 1:
        total = comm.all_reduce(total, state.pp_group)
    norm = float(total.sqrt())
    coef = max_norm / (norm + 1e-6)
    if max_norm > 0 and coef < 1:
        for p in params:
            p.grad.detach().mul_(coef)
    return norm
