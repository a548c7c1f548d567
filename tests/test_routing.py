"""Routing and balancing options of the router, on hand-sized cases."""

import importlib.util
from pathlib import Path

import numpy
import pytest
import torch

from megamoe.analysis.load import heatmap_image, step_load_metrics
from megamoe.moe.router import Router, load_balancing_loss, update_expert_bias

REPO = Path(__file__).resolve().parent.parent


def test_sequence_scope_averages_each_sequences_loss():
    # 2 sequences of 2 tokens, 2 experts, top-1. Sequence 0 sends both tokens to expert 0:
    # f = (1, 0), P = (0.7, 0.3) -> 2 · 0.7 = 1.4. Sequence 1 splits: f = (.5, .5), P = (.5, .5) -> 1.
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]])
    top = torch.tensor([[0], [0], [0], [1]])
    assert load_balancing_loss(probs, top, 2, num_sequences=2).item() == pytest.approx((1.4 + 1.0) / 2)
    # over the micro-batch: f = (.75, .25), P = (.6, .4) -> 2 · (.45 + .1) = 1.1
    assert load_balancing_loss(probs, top, 2).item() == pytest.approx(1.1)


def biased_router(bias):
    router = Router(2, 3, 1, expert_bias=True)
    with torch.no_grad():
        router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        router.expert_bias.copy_(torch.tensor(bias))
    return router


def test_expert_bias_steers_the_choice_not_the_weight():
    x = torch.tensor([[2.0, 0.0]])  # probs ≈ (0.787, 0.107, 0.107): expert 0 wins unbiased
    probs = torch.softmax(x @ biased_router([0.0, 0.0, 0.0]).weight.t(), -1)[0]
    assert biased_router([0.0, 0.0, 0.0])(x).expert_idx.tolist() == [0]
    steered = biased_router([-0.7, 0.0, 0.1])(x)  # 0.087 < 0.107 < 0.207: expert 2
    assert steered.expert_idx.tolist() == [2]
    assert steered.weight.item() == pytest.approx(probs[2].item())  # its probability, unbiased


def test_expert_bias_moves_by_the_sign_of_the_load_gap():
    routers = {0: Router(2, 3, 1, expert_bias=True), 1: Router(2, 3, 1, expert_bias=True)}
    load = torch.tensor([[6.0, 1.0, 2.0], [3.0, 3.0, 3.0]])  # layer 0: mean 3
    update_expert_bias(routers, load, 0.01)
    update_expert_bias(routers, load, 0.01)
    assert routers[0].expert_bias.tolist() == pytest.approx([-0.02, 0.02, 0.02])
    assert routers[1].expert_bias.tolist() == [0.0, 0.0, 0.0]  # balanced: unchanged
    assert routers[0].expert_bias.dtype == torch.float32
    assert "expert_bias" in routers[0].state_dict() and "expert_bias" not in Router(2, 3, 1).state_dict()


def test_router_dtype_fp32_computes_a_bf16_models_logits_in_fp32():
    torch.manual_seed(0)
    x = torch.randn(64, 32).bfloat16()
    weight = (torch.randn(8, 32) * 0.5).bfloat16()
    exact = torch.softmax(x.float() @ weight.float().t(), -1)  # [T, E] from fp32 logits of the bf16 numbers
    for dtype in ("model", "fp32"):
        router = Router(32, 8, 2, router_dtype=dtype).bfloat16()
        router.weight.data.copy_(weight)
        r = router(x)
        got = r.weight.view(64, 2)
        want = exact.gather(-1, r.expert_idx.view(64, 2))
        if dtype == "fp32":
            assert got.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        else:  # bf16 logits and weights: off by bf16 rounding
            assert got.dtype == torch.bfloat16 and (got.float() - want).abs().max() > 1e-4


def test_step_load_metrics_on_a_hand_case():
    load = torch.tensor([[6.0, 1.0, 2.0], [3.0, 3.0, 3.0]])  # 2 MoE layers, 3 experts
    bias = torch.tensor([[-0.02, 0.01, 0.03], [0.0, 0.0, 0.0]])
    m = step_load_metrics(load, routed=10, bias=bias)
    assert m["load_max_over_mean"] == pytest.approx([2.0, 1.0])
    assert m["load_cv"] == pytest.approx([(14 / 3) ** 0.5 / 3, 0.0])  # population std of (6, 1, 2) = √(14/3)
    assert m["dropped_fraction"] == pytest.approx([0.1, 0.1])
    assert m["bias_spread"] == pytest.approx([0.05, 0.0])
    assert set(step_load_metrics(load)) == {"load_max_over_mean", "load_cv"}


def test_heatmap_is_white_at_the_fair_share_red_above_blue_below():
    img = heatmap_image([[0.5, 0.25, 0.25, 0.0]], cell=2)  # 4 experts: fair share 0.25
    assert img.shape == (3, 2, 8) and img.dtype == numpy.uint8
    assert img[:, 0, 0].tolist() == [255, 0, 0]  # 2× the fair share: red
    assert img[:, 1, 3].tolist() == [255, 255, 255]  # exactly fair: white
    assert img[:, 0, 7].tolist() == [0, 0, 255]  # no load: blue


def test_gpu_smoke_script_cpu_path_prints_a_table_and_fails_on_a_failing_case(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("gpu_routing_smoke", REPO / "bench" / "gpu_routing_smoke.py")
    smoke = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(smoke)
    assert smoke.main(["--tiny", "--steps", "1", "--cases", "expert_choice", "aux_free_bias"]) == 0
    table = capsys.readouterr().out
    assert "expert_choice        eager     ok" in table and "all cases passed" in table
    monkeypatch.setitem(smoke.CASES, "broken", ["moe.routing=expert_choice", "moe.bias_update_rate=0.1"])
    assert smoke.main(["--tiny", "--steps", "1", "--cases", "broken"]) == 1
    assert "broken               eager     FAILED" in capsys.readouterr().out


@pytest.mark.parametrize("compiled", [False, True])
def test_top_k_by_argmax_rounds_is_torch_topk(compiled):
    """The top-k that compiled CUDA routers use (k rounds of argmax and masking): torch.topk's
    values in descending order on random scores, the lower index first on ties, and the same
    function when inductor compiles it (here for the CPU)."""
    from megamoe.moe.router import top_k_indices
    fn = torch.compile(top_k_indices, dynamic=False) if compiled else top_k_indices
    scores = torch.rand(300, 64, generator=torch.Generator().manual_seed(0)).softmax(-1)
    scores[7] = 1 / 64  # every expert tied
    scores[9, [3, 40]] = scores[9].max() + 1  # a tie for first place
    got = fn(scores, 8)
    want = torch.topk(scores, 8, dim=-1)
    rows = [r for r in range(300) if r not in (7, 9)]
    assert torch.equal(got[rows], want.indices[rows])
    assert torch.equal(scores.gather(-1, got), want.values)
    assert got[7].tolist() == list(range(8)) and got[9, :2].tolist() == [3, 40]
