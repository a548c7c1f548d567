"""Routing and balancing options of the router, on hand-sized cases."""

import pytest
import torch

from megamoe.moe.router import load_balancing_loss


def test_sequence_scope_averages_each_sequences_loss():
    # 2 sequences of 2 tokens, 2 experts, top-1. Sequence 0 sends both tokens to expert 0:
    # f = (1, 0), P = (0.7, 0.3) -> 2 · 0.7 = 1.4. Sequence 1 splits: f = (.5, .5), P = (.5, .5) -> 1.
    probs = torch.tensor([[0.6, 0.4], [0.8, 0.2], [0.9, 0.1], [0.1, 0.9]])
    top = torch.tensor([[0], [0], [0], [1]])
    assert load_balancing_loss(probs, top, 2, num_sequences=2).item() == pytest.approx((1.4 + 1.0) / 2)
    # over the micro-batch: f = (.75, .25), P = (.6, .4) -> 2 · (.45 + .1) = 1.1
    assert load_balancing_loss(probs, top, 2).item() == pytest.approx(1.1)
