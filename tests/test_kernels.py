"""The fast dispatch paths compute the same function, and the same gradients, as the plain ones."""

import dataclasses

import torch

from megamoe.moe.dispatch import Dispatcher
from megamoe.moe.experts import SwiGLUExperts
from megamoe.moe.router import Router, expert_counts


def test_expert_counts_is_bincount():
    idx = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(expert_counts(idx, 9), torch.bincount(idx, minlength=9))


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
