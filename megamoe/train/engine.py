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

from .. import deepspeed_adapter
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


def check_fp8_device(cfg: Config, device: torch.device, capability: tuple[int, int] | None = None) -> None:
    """Refuse FP8 experts or attention projections on a GPU before Hopper (sm_90), whose tensor cores the FP8
    products need: there they would run dequantized (the experts one at a time), slower than bf16. (On the
    CPU that path is the reference the tests hold the GPU to, and runs.) `capability`: (major, minor)
    for tests."""
    keys = cfg.fp8_keys()
    if not keys or device.type != "cuda":
        return
    major, minor = capability or torch.cuda.get_device_capability(device)
    if (major, minor) < (9, 0):
        from ..config import ConfigError
        name = torch.cuda.get_device_name(device) if capability is None else "this GPU"
        raise ConfigError(f"{keys[0]}: fp8 needs FP8 tensor cores of a Hopper or later GPU (sm_90+); "
                          f"{name} is sm_{major}{minor}, where the FP8 products would run dequantized, "
                          f"slower than bf16: set {keys[0]}=model")


def check_memory(cfg: Config, world_size: int, local_ranks: int, device: torch.device,
                 available: float | None = None) -> None:
    """Refuse a run whose model state alone (weights, gradients, AdamW state: `megamoe-plan`'s count)
    cannot fit where it will live, before anything is set up or written. On the CPU that is the
    host's available memory for all of its ranks: past it the kernel kills the job without a word,
    after pressing every other process on the host. On a GPU it is one card's memory (with
    `optim.offload: cpu` the weights and gradients only, the rest on the host), plus the FP8 experts'
    quantized weights where the trainer keeps them across micro-batches. Activations come on
    top, so a run that passes may still not fit; one that fails cannot. `available`: bytes (tests)."""
    from ..config import ConfigError
    from ..parallel.plan import fp8_cache_bytes, rank_state_bytes
    bf16 = resolve_dtype(cfg, device) != torch.float32
    state = rank_state_bytes(cfg, world_size, bf16)
    cache = fp8_cache_bytes(cfg, world_size)  # kept on the weights' device, offloaded or not
    gib = 2**30
    params = cfg.model.param_counts(cfg.moe)
    size = f"{sum(params.values()) / 1e9:.2f}B parameters"
    if device.type == "cuda":
        # offloaded: weights + gradients stay (bf16 2 + 2 of 16 bytes a parameter; fp32 4 + 4 of 16)
        on_gpu = state * ((4 if bf16 else 8) / 16 if cfg.optim.offload == "cpu" else 1) + cache
        have = available if available is not None else torch.cuda.get_device_properties(device).total_memory
        if on_gpu > have >= on_gpu - cache:
            raise ConfigError(
                f"train.fp8_weight_cache: {size} need {on_gpu / gib:.1f} GiB on each GPU with the FP8 experts' weights "
                f"kept quantized across a step's micro-batches ({cache / gib:.1f} GiB of it), and the GPU has "
                f"{have / gib:.1f} GiB: set train.fp8_weight_cache=false (quantized in every forward and backward "
                f"instead, slower) or spread the model over more GPUs (parallel.*; `megamoe-plan --gpu-gib`)")
        if on_gpu > have:
            raise ConfigError(
                f"model: {size} need {on_gpu / gib:.1f} GiB on each GPU for their weights, gradients and "
                f"optimizer state in this layout, and the GPU has {have / gib:.1f} GiB: spread them over more "
                f"GPUs (parallel.expert / tensor / pipeline; `megamoe-plan --gpu-gib` lists layouts), keep the "
                f"optimizer in host memory (optim.offload=cpu, parallel.zero_stage=0) or train fewer model.n_layers")
        return
    state += cache
    have = available if available is not None else host_available_bytes()
    if have is not None and state * local_ranks > have:
        ranks = f"{local_ranks} ranks × {state / gib:.1f} GiB" if local_ranks > 1 else "one rank"
        raise ConfigError(
            f"model: {size} need {state * local_ranks / gib:.1f} GiB of this host's memory for their "
            f"weights, gradients and optimizer state ({ranks}; activations come on top), and "
            f"{have / gib:.1f} GiB is available: train a smaller model (e.g. --config tiny-cpu), spread it "
            f"over more hosts (parallel.*; `megamoe-plan` lists layouts) or train on GPUs (train.device=cuda)")


def host_available_bytes() -> float | None:
    """This host's available memory (Linux's MemAvailable), within a cgroup's limit where one is
    set; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit) as a, open(usage) as b:
                cap = a.read().strip()
                if cap != "max" and int(cap) < 2**60:
                    found.append(int(cap) - int(b.read().strip()))
        except (OSError, ValueError):
            pass
    return float(min(found)) if found else None


def build_model(cfg: Config, state: ParallelState) -> OLMoE:
    """The plain model, cut to this rank's layout and initialised like the 1-rank model."""
    model = cfg.model.build(cfg.moe)
    if state.pp > 1:
        from ..parallel.pipeline import apply_pipeline
        apply_pipeline(model, state, cfg.parallel.pipeline_layers)
    if state.tp > 1:
        from ..parallel.tensor import apply_tensor_parallel
        apply_tensor_parallel(model, state, cfg.parallel.sequence_parallel)
    if state.ep > 1:
        from ..parallel.expert import apply_expert_parallel
        apply_expert_parallel(model, state)
    if cfg.moe.lb_loss_scope == "global_batch" and state.dp > 1:
        from ..parallel.balance import apply_global_load_balancing
        apply_global_load_balancing(model, state)
    init_weights(model, cfg.model.init_std, cfg.train.seed)
    if cfg.parallel.activation_checkpointing != "none":
        from ..parallel.activation_checkpointing import apply_activation_checkpointing
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


def zero_stage(cfg: Config, state: ParallelState) -> int:
    """The ZeRO stage this run's optimizer runs: `parallel.zero_stage`, but 0 on one data-parallel
    rank. ZeRO partitions the optimizer's state (and, at 2, the gradients) over the data-parallel
    ranks: over one it saves nothing and costs time (one H100, 8 OLMoE layers, 2026-11-24: DeepSpeed's
    step 235.6 ms, megamoe's 39.0; docs/performance.md). Both are AdamW with fp32 masters, clipped,
    skipping non-finite steps, and checkpoint alike, so a run resumes from either into the other."""
    return cfg.parallel.zero_stage if state.dp > 1 else 0


def build_optimizer(cfg: Config, model: nn.Module, state: ParallelState,
                    device: torch.device) -> torch.optim.Optimizer:
    """ZeRO 0: our AdamW (fp32 masters for bf16 weights, clipping and the non-finite guard in one
    fused pass per parameter). ZeRO 1/2: the inner optimizer DeepSpeed's partitioned one steps:
    apex FusedAdam when NVIDIA apex is installed, else torch's AdamW (fused on GPU)."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    if zero_stage(cfg, state) == 0:
        from .optimizer import AdamW
        return AdamW(groups, state, max_norm=o.grad_clip, master_weights=resolve_dtype(cfg, device) != torch.float32,
                     offload=o.offload == "cpu", **kwargs)
    if device.type == "cuda":
        try:
            from apex.optimizers import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **kwargs)
        except ImportError:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def deepspeed_config(cfg: Config, state: ParallelState, dtype: torch.dtype) -> dict:
    """DeepSpeed's config for this run.

    ZeRO 0: DeepSpeed sees a plain optimizer (ours, which keeps fp32 masters itself, clips and
    skips non-finite steps) and only reduces gradients over data parallelism, in fp32.
    ZeRO 1/2: DeepSpeed's partitioned optimizer keeps fp32 masters and Adam moments per parameter
    through its fragment mapping (which checkpoints read), clips, and skips a step whose gradient
    norm is not finite (`bf16.check_grad_overflow`).
    """
    t, zero = cfg.train, zero_stage(cfg, state)
    bf16 = dtype == torch.bfloat16
    config = {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accumulation_steps(state.world_size),
        "gradient_clipping": cfg.optim.grad_clip if zero else 0.0,
        "zero_optimization": {"stage": zero},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16 and zero > 0, "check_grad_overflow": True},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # DeepSpeed's throughput timer is on and synchronised by default: a device-wide sync at each
        # micro-batch's forward and each step() call. The trainer measures tokens/s itself.
        "timers": {"throughput": {"enabled": False, "synchronized": False}},
    }
    if bf16 and zero == 0:
        config["communication_data_type"] = "fp32"  # bf16 gradients are averaged over DP in fp32
    return config


def build_engine(cfg: Config, state: ParallelState, model: nn.Module, device: torch.device):
    """The DeepSpeed engine over our model, optimizer and process groups."""
    dtype = resolve_dtype(cfg, device)
    model.to(device)
    optimizer = build_optimizer(cfg, model, state, device)  # fp32 masters from the fp32 init
    zero = zero_stage(cfg, state)
    if dtype != torch.float32 and zero == 0:  # DeepSpeed casts under ZeRO 1/2
        for p in model.parameters():
            p.data = p.data.to(dtype)
    if state.ep > 1 and cfg.moe.backend != "deepspeed":  # DeepSpeed finds its own MoE modules
        deepspeed_adapter.mark_moe(model, cfg.moe.num_experts, state.ep)
    # ZeRO 0 on one DP rank: no replica to average gradients with
    return deepspeed_adapter.initialize(model, optimizer, state, deepspeed_config(cfg, state, dtype),
                                        allreduce_gradients=zero > 0 or state.dp > 1)
