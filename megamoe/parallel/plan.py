"""Layout planning: which (tensor, pipeline, expert) layouts fit a world size, and what one
rank then holds — parameters and the bytes of weights, gradients and optimizer state.

Parameter counts are exact (they follow the cuts `apply_pipeline`, `apply_tensor_parallel`
and `apply_expert_parallel` make; a test builds the layouts and counts). Memory is the model
state only (with the FP8 experts' weights the trainer keeps quantized across a step's
micro-batches) — activations come on top and depend on micro-batch size, sequence length and
activation checkpointing.
"""

import dataclasses
from dataclasses import dataclass

from ..config import Config, ConfigError
from .pipeline import stage_layers


@dataclass
class Plan:
    tp: int
    pp: int
    ep: int
    dp: int
    params_per_rank: int  # the largest over pipeline stages
    state_gib: float      # weights + gradients + optimizer state on that rank (+ FP8's weight cache)


def stage_param_counts(cfg: Config, tp: int, pp: int, ep: int) -> list[dict[str, int]]:
    """Parameters by kind (`ModelConfig.param_counts`) held by one rank of each pipeline stage."""
    stages = stage_layers(cfg.model.n_layers, pp, cfg.parallel.pipeline_layers)
    return [cfg.model.param_counts(cfg.moe, layers, embedding=s == 0, head=s == pp - 1, tp=tp, ep=ep)
            for s, layers in enumerate(stages)]


def params_per_stage(cfg: Config, tp: int, pp: int, ep: int) -> list[int]:
    """Parameters held by one rank of each pipeline stage."""
    return [sum(counts.values()) for counts in stage_param_counts(cfg, tp, pp, ep)]


def _state_bytes(cfg: Config, tp: int, pp: int, ep: int, dp: int, stage: int, bf16: bool) -> float:
    """Weights + grads + Adam state of one rank; ZeRO-1/2 shard the optimizer state (and ZeRO-2
    the gradients) over data parallelism (dense) or expert-data parallelism (experts)."""
    counts = stage_param_counts(cfg, tp, pp, ep)[stage]
    experts = counts["experts"]
    dense = sum(counts.values()) - experts
    zero = cfg.parallel.zero_stage
    weight, grad, optim = (2, 2, 12) if bf16 else (4, 4, 8)  # bf16: fp32 master + 2 moments
    out = 0.0
    for n, shard in ((dense, dp), (experts, dp // ep)):
        s = shard if zero >= 1 else 1
        out += n * (weight + grad / (shard if zero >= 2 else 1) + optim / s)
    return out


def rank_state_bytes(cfg: Config, world_size: int, bf16: bool) -> float:
    """Weights + gradients + optimizer state of one rank of `cfg`'s own layout (its largest
    pipeline stage's), as `plan_layouts` counts them."""
    p = cfg.parallel
    dp = world_size // (p.tensor * p.pipeline)
    return max(_state_bytes(cfg, p.tensor, p.pipeline, p.expert, dp, s, bf16) for s in range(p.pipeline))


def fp8_cache_bytes(cfg: Config, world_size: int) -> float:
    """The FP8 experts' (and, on one rank of TP, attention projections') weights as the trainer keeps them
    quantized across a step's micro-batches (`train.fp8_weight_cache`, with more than one micro-batch a step):
    two e4m3 forms, two bytes a parameter of theirs on one rank (its largest pipeline stage's); 0 where no
    cache is kept."""
    p = cfg.parallel
    experts, attention = cfg.moe.expert_precision == "fp8", cfg.model.attention_precision == "fp8" and p.tensor == 1
    if not ((experts or attention) and cfg.train.fp8_weight_cache and cfg.grad_accumulation_steps(world_size) > 1):
        return 0.0
    return 2.0 * max(c["experts"] * experts + c["attention"] * attention
                     for c in stage_param_counts(cfg, p.tensor, p.pipeline, p.expert))


def plan_layouts(cfg: Config, world_size: int, bf16: bool = True) -> list[Plan]:
    """Every valid layout of `world_size` ranks for `cfg`, least state per rank first; a
    ConfigError with each reason a layout failed for when none is valid."""
    plans, reasons = [], {}
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            for ep in _divisors(world_size // (tp * pp)):
                c = dataclasses.replace(cfg, parallel=dataclasses.replace(
                    cfg.parallel, tensor=tp, pipeline=pp, expert=ep, pipeline_layers=None,
                    sequence_parallel=cfg.parallel.sequence_parallel and tp > 1))
                try:
                    c.validate(world_size)
                except ConfigError as e:
                    reasons.setdefault(str(e), f"tensor={tp} pipeline={pp} expert={ep}")
                    continue
                dp = world_size // (tp * pp)
                per_stage = params_per_stage(c, tp, pp, ep)
                state = max(_state_bytes(c, tp, pp, ep, dp, s, bf16) for s in range(pp)) + fp8_cache_bytes(c, world_size)
                plans.append(Plan(tp, pp, ep, dp, max(per_stage), state / 2**30))
    if not plans:
        raise ConfigError(f"no layout of {world_size} ranks is valid for this config: "
                          + "; ".join(f"{where}: {why}" for why, where in reasons.items()))
    return sorted(plans, key=lambda p: (p.state_gib, p.tp * p.pp))


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]
