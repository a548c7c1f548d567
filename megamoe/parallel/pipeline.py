"""Pipeline parallelism, the cut: each stage holds a contiguous run of blocks.

`apply_pipeline` cuts an OLMoE in place to this stage's blocks (keys of `model.layers` stay the
global layer indices, so parameter names stay canonical), the embedding on the first stage and
the final norm and LM head on the last; an earlier stage's forward then returns its blocks'
output where the last returns logits. `pipeline_schedule.py` runs the stages.
"""

from torch import nn

from .state import ParallelState


def stage_layers(n_layers: int, pp: int, layers_per_stage: list[int] | None) -> list[range]:
    """The global layer indices of every stage: the given counts, or an even split."""
    counts = layers_per_stage or [n_layers // pp] * pp
    assert len(counts) == pp and sum(counts) == n_layers, (counts, n_layers)
    starts = [sum(counts[:i]) for i in range(pp)]
    return [range(s, s + c) for s, c in zip(starts, counts)]


def apply_pipeline(model: nn.Module, state: ParallelState, layers_per_stage: list[int] | None) -> nn.Module:
    """Keep only this stage's blocks (and embed / norm + lm_head on the first / last stage).
    Apply before tensor parallelism, which converts embed and lm_head only where present."""
    mine = stage_layers(len(model.layers), state.pp, layers_per_stage)[state.pp_rank]
    for key in list(model.layers.keys()):
        if int(key) not in mine:
            del model.layers[key]
    if not state.is_first_stage:
        model.embed = None  # the stage starts from the previous stage's `hidden`
    if not state.is_last_stage:
        model.norm, model.lm_head = nn.Identity(), nn.Identity()  # hands its blocks' output on
    return model
