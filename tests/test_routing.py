"""Routing and balancing options of the router, on hand-sized cases."""

import pytest
import torch

from megamoe.moe.router import Router, load_balancing_loss, update_expert_bias


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
