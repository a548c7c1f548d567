"""`moe.backend: deepspeed`: DeepSpeed-MoE's layer trains through the trainer, alone and under EP2,
and EP2 gives the 1-rank run (DeepSpeed's top-k gating is deterministic once use_rts is off)."""

import math

import pytest

from runs import assert_same_run, final_weights, launch, metrics

DS = ["moe.backend=deepspeed", "moe.top_k=3"]  # k >= 3: DeepSpeed's general top-k gating


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory):
    run = tmp_path_factory.mktemp("ds1")
    launch(run, 1, DS + ["train.steps=8", "train.save_interval=8"])
    return run


def test_trains_on_one_rank(one_rank):
    records = metrics(one_rank)
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], losses
    assert all(r["lb_loss"] > 0 and r["z_loss"] > 0 for r in records)  # stats reach the logs
    assert len(records[0]["expert_load"]) == 2 and len(records[0]["expert_load"][0]) == 8
    names = final_weights(one_rank)
    assert "layers.1.ffn.moe.deepspeed_moe.experts.deepspeed_experts.7.w1" in names


def test_ep2_equals_one_rank(one_rank, tmp_path):
    launch(tmp_path, 2, DS + ["train.steps=8", "train.save_interval=8", "parallel.expert=2"])
    assert_same_run(tmp_path, one_rank)


def test_capacity_factor_trains_under_ep2(tmp_path):
    launch(tmp_path, 2, DS + ["moe.capacity_factor=1.0", "parallel.expert=2"])
    losses = [r["loss"] for r in metrics(tmp_path)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
