"""The fast dispatch paths compute the same function, and the same gradients, as the plain ones."""

import dataclasses

import pytest
import torch

from megamoe.moe.dispatch import Dispatcher, sort_keys
from megamoe.moe.experts import SwiGLUExperts
from megamoe.moe.router import Router, expert_counts, load_balancing_loss


def test_expert_counts_is_bincount():
    idx = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx, minlength=9))


def test_load_balancing_counts_per_sequence():
    """f_i counted per sequence: the loss equals its definition with bincount, sequence by sequence."""
    g = torch.Generator().manual_seed(1)
    B, S, E, k = 3, 20, 6, 2
    probs = torch.rand(B * S, E, generator=g).softmax(-1)
    top = probs.topk(k, dim=-1).indices
    want = torch.stack([E * (torch.bincount(top[b * S:(b + 1) * S].flatten(), minlength=E) / S
                             * probs[b * S:(b + 1) * S].mean(0)).sum() for b in range(B)]).mean()
    torch.testing.assert_close(load_balancing_loss(probs, top, E, num_sequences=B), want)


@pytest.mark.parametrize("num_experts", [8, 256, 257, 40000])
def test_narrow_sort_keys_keep_the_stable_order(num_experts):
    """Sorting the expert ids as uint8/int16/int32 gives the int64 ids' stable order, ties included."""
    idx = torch.randint(0, num_experts, (5000,), generator=torch.Generator().manual_seed(num_experts))
    idx[:50] = num_experts - 1  # the largest id, many times: the narrow type must hold it
    keys = sort_keys(idx, num_experts)
    assert keys.element_size() < idx.element_size()
    assert torch.equal(torch.argsort(keys, stable=True), torch.argsort(idx, stable=True))


def test_dense_top_k_dispatch_matches_index_add_path():
    """Dropless token choice (gather + sum over k) equals the general gather/index_add_ path:
    output, and gradients of input, routing weights and expert weights, in float64."""
    T, d, E, k, F = 40, 12, 8, 3, 10
    g = torch.Generator().manual_seed(0)
    router = Router(d, E, k).double()
    experts = SwiGLUExperts(E, d, F).double()
    with torch.no_grad():
        for p in (*router.parameters(), *experts.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    x = torch.randn(T, d, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(T, d, generator=g, dtype=torch.float64)

    results = []
    for fast in (True, False):
        routing = router(x)
        assert routing.top_k == k
        if not fast:
            routing = dataclasses.replace(routing, top_k=0)
        y = Dispatcher(E).run(x, routing, experts)
        params = [x, router.weight, experts.w1, experts.w2]
        results.append([y, *torch.autograd.grad(y, params, dy)])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_capacity_routing_is_not_dense():
    router = Router(8, 4, 2, capacity_factor=1.0)
    with torch.no_grad():
        router.weight.normal_()
    routing = router(torch.randn(16, 8))
    assert routing.top_k == 0
    assert torch.equal(routing.expert_load, torch.bincount(routing.expert_idx, minlength=4))


def test_sum_rows_compiled_form_equals_eager_form(monkeypatch):
    """_sum_rows has a second formulation for torch.compile (k gathers added one by one)."""
    from megamoe.moe import dispatch
    g = torch.Generator().manual_seed(0)
    src = torch.randn(30, 5, generator=g, dtype=torch.float64)
    index = torch.randperm(30, generator=g).view(10, 3)
    weight = torch.rand(10, 3, generator=g, dtype=torch.float64)
    eager = [dispatch._sum_rows(src, index), dispatch._sum_rows(src, index, weight)]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    compiled_form = [dispatch._sum_rows(src, index), dispatch._sum_rows(src, index, weight)]
    for a, b in zip(eager, compiled_form):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
