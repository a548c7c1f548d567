"""Expert parallelism (alone, with data parallelism, with tensor ± sequence parallelism) is the
1-rank model: each data-parallel rank routes its own micro-batch, so the reference is the
1-rank model run on every rank's micro-batch, averaged as the engine averages (see
test_tensor_parallel); losses and every gradient shard agree to 1e-5."""

import pytest

from distributed import run_ranks
from megamoe.parallel.state import ParallelState
from test_tensor_parallel import assert_layout_matches, build, tiny


@pytest.mark.parametrize("world_size,layout,moe", [
    (2, dict(ep=2), dict()),
    (4, dict(ep=4), dict()),
    (4, dict(ep=2), dict(num_shared_experts=1)),  # DP4 = EP2 × expert-DP2
    (2, dict(ep=2), dict(capacity_factor=1.0)),
    (2, dict(ep=2), dict(routing="expert_choice")),
    (4, dict(tp=2, ep=2), dict()),
    (4, dict(tp=2, ep=2, sp=True, tp_first=True), dict(capacity_factor=1.0)),
], ids=["ep2", "ep4", "ep2-dp4-shared", "ep2-capacity", "ep2-expert-choice", "tp2xep2",
        "tp2xep2-sp-capacity-tp-first"])
def test_expert_parallel_gives_the_one_rank_loss_and_grads(world_size, layout, moe):
    assert_layout_matches(tiny(**moe), world_size, layout)


def expert_markers(rank: int, world_size: int) -> list:
    state = ParallelState(world_size, rank, ep=2).build_groups()
    model = build(tiny(), state, dict(ep=2))
    return [(name, tuple(p.shape), p.__dict__.get("allreduce"), p.__dict__.get("group_name"))
            for name, p in model.named_parameters() if "experts" in name]


def test_expert_params_are_cut_and_marked_for_deepspeed():
    for rank_params in run_ranks(expert_markers, 2):
        assert rank_params, "no expert parameters"
        for name, shape, allreduce, group_name in rank_params:
            assert shape[0] == 4, f"{name}: {shape} should hold 8 experts / ep 2"
            assert allreduce is False and group_name == "ep_size_2", name
