"""Tensor parallelism (± sequence parallelism) is the 1-rank model: a tiny fp32 OLMoE on gloo
ranks gives the 1-rank loss and, shard by shard, the 1-rank gradients (relative error < 1e-5).

The layout helpers here (`run_layout`, `assert_layout_matches`) serve the expert-parallel
tests too: each data-parallel rank runs its own micro-batch, gradients are averaged the way the
engine does (dense over DP, experts over expert-DP, both ÷ DP), and the 1-rank reference runs
every micro-batch and averages the same way.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from distributed import RankFailed, run_ranks
from megamoe.config import Config, DataConfig, ModelConfig, MoEConfig
from megamoe.model.fp8_linear import fp8_linear
from megamoe.model.olmoe import OLMoE, init_weights
from megamoe.parallel import mappings
from megamoe.parallel.expert import apply_expert_parallel
from megamoe.sharding import local_slice, mark_shard, shards
from megamoe.parallel.state import ParallelState
from megamoe.parallel.tensor import apply_tensor_parallel
from megamoe.train.loss import cross_entropy, cross_entropy_for

SEQ, BATCH, RTOL = 16, 2, 1e-5


def tiny(model: dict | None = None, **moe) -> Config:
    moe = {**dict(num_experts=8, top_k=2, ffn_hidden=16, lb_loss_weight=0.1, z_loss_weight=0.01), **moe}
    model = {**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=SEQ), **(model or {})}
    cfg = Config(model=ModelConfig(**model), moe=MoEConfig(**moe), data=DataConfig(seq_length=SEQ))
    return cfg.validate()


def micro_batches(cfg: Config, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n micro-batches of (tokens, labels) [BATCH, SEQ]; a few labels are -100 (ignored)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, cfg.model.vocab_size, (BATCH, SEQ + 1), generator=g)
        labels = tokens[:, 1:].clone()
        labels[torch.rand(labels.shape, generator=g) < 0.1] = -100
        out.append((tokens[:, :-1], labels))
    return out


def build(cfg: Config, state: ParallelState, layout: dict) -> OLMoE:
    """The model of `layout` (keys tp, ep, sp, tp_first) on this rank, with the canonical weights."""
    model = cfg.model.build(cfg.moe)
    transforms = [lambda: apply_expert_parallel(model, state),
                  lambda: apply_tensor_parallel(model, state, layout.get("sp", False))]
    for transform in reversed(transforms) if layout.get("tp_first") else transforms:
        transform()
    init_weights(model, std=0.2, seed=0)  # large std: routing decisions are not all ties
    return model


def micro_batch_loss(out, labels: torch.Tensor, cross_entropy) -> torch.Tensor:
    """The trainer's loss of one micro-batch: mean cross-entropy over its targets + aux loss."""
    return cross_entropy(out.logits, labels) / (labels != -100).sum() + out.aux_loss


def run_layout(rank: int, world_size: int, cfg: Config, layout: dict, data: list) -> tuple:
    """One rank: forward/backward on its DP rank's micro-batch, then the engine's DP mean.
    Returns (loss, {name: (grad, shard marks)})."""
    state = ParallelState(world_size, rank, tp=layout.get("tp", 1), ep=layout.get("ep", 1)).build_groups()
    model = build(cfg, state, layout)
    tokens, labels = data[state.dp_rank]
    loss = micro_batch_loss(model(tokens), labels, cross_entropy_for(state))  # vocab-parallel under TP
    loss.backward()
    loss = loss.detach()
    if state.dp > 1:
        dist.all_reduce(loss, group=state.dp_group)
        for p in model.parameters():
            dist.all_reduce(p.grad, group=state.edp_group if p.__dict__.get("allreduce", True) is False
                            else state.dp_group)
        loss /= state.dp
        for p in model.parameters():
            p.grad /= state.dp
    return loss, {name: (p.grad, shards(p)) for name, p in model.named_parameters()}


def reference(cfg: Config, data: list) -> tuple:
    """The 1-rank model on every micro-batch, averaged: (loss, {name: full grad})."""
    model = cfg.model.build(cfg.moe)
    init_weights(model, std=0.2, seed=0)
    loss = sum(micro_batch_loss(model(tokens), labels, cross_entropy) for tokens, labels in data) / len(data)
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def assert_layout_matches(cfg: Config, world_size: int, layout: dict) -> None:
    """Every rank's loss and every rank's gradient shard equal the 1-rank run's."""
    dp = world_size // layout.get("tp", 1)
    data = micro_batches(cfg, dp)
    results = run_ranks(run_layout, world_size, cfg, layout, data)
    want_loss, want_grads = reference(cfg, data)
    for rank, (loss, grads) in enumerate(results):
        assert rel_err(loss, want_loss) < RTOL, f"rank {rank}: loss {loss} vs 1-rank {want_loss}"
        assert grads.keys() == want_grads.keys()
        for name, (grad, marks) in grads.items():
            holder = torch.empty_like(grad)
            for mark in marks:
                mark_shard(holder, *mark)
            want = local_slice(holder, want_grads[name])  # this rank's piece of the full grad
            assert grad.shape == want.shape, f"rank {rank} {name}: shape {grad.shape} vs {want.shape}"
            err = rel_err(grad, want)
            assert err < RTOL, f"rank {rank} {name}: gradient relative error {err:.2e}"


@pytest.mark.parametrize("layout,moe", [
    (dict(tp=2), dict()),
    (dict(tp=2, sp=True), dict()),
    (dict(tp=2, sp=True), dict(capacity_factor=1.0, num_shared_experts=1)),
    (dict(tp=2, sp=True), dict(routing="expert_choice")),
    (dict(tp=2, sp=True), dict(num_experts=0)),
], ids=["tp2", "tp2-sp", "tp2-sp-capacity-shared", "tp2-sp-expert-choice", "tp2-sp-dense"])
def test_tensor_parallel_gives_the_one_rank_loss_and_grads(layout, moe):
    assert_layout_matches(tiny(**moe), 2, layout)


FP8_ATTENTION = dict(attention_precision="fp8", n_heads=2)  # head dimension 16, as FP8 products need


@pytest.mark.parametrize("layout", [dict(tp=2), dict(tp=2, sp=True)], ids=["tp2", "tp2-sp"])
def test_fp8_attention_under_tensor_parallelism_is_the_one_rank_model(layout):
    """`model.attention_precision=fp8`: the TP ranks' column- and row-parallel projections run the FP8
    products (the 1-rank fp8 model's loss and gradients, which the bf16 projections miss by ~4e-4)."""
    assert_layout_matches(tiny(FP8_ATTENTION), 2, layout)


def run_fp8_linears(rank: int, world_size: int, x, w_row, w_column, grad) -> dict:
    """`fp8_linear` cut as a row-parallel (input features) and as a column-parallel (output features) layer
    on this rank: the full output and input gradient (summed over the ranks), this rank's weight gradient."""
    group = dist.group.WORLD
    out = {}
    xs, ws = (t.chunk(world_size, -1)[rank].clone().requires_grad_() for t in (x, w_row))
    y = fp8_linear(xs, ws, in_group=group)  # partial sums of the output
    y.backward(grad)
    dist.all_reduce(y := y.detach())
    out["row"] = (y, xs.grad, ws.grad)
    xc, wc = x.clone().requires_grad_(), w_column.chunk(world_size, 0)[rank].clone().requires_grad_()
    y = fp8_linear(xc, wc, out_group=group)  # this rank's output columns
    y.backward(grad.chunk(world_size, -1)[rank])
    dist.all_reduce(grad_x := xc.grad)
    out["column"] = (y.detach(), grad_x, wc.grad)
    return out


def test_fp8_linear_scales_a_cut_slice_by_its_whole_largest_magnitude():
    """A scale's slice that the TP cut splits (a row-parallel layer's input rows and weight rows, a
    column-parallel one's output-gradient rows and weight columns) takes its largest magnitude over the group:
    every e4m3 value is the 1-rank layer's. Power-of-two scales make most values the same either way (e4m3
    keeps 3 mantissa bits in every binade); what tells is a half-slice 1e5 smaller than the other, which the
    1-rank scale rounds to e4m3's subnormals and its own rank's scale would keep at full precision. The other
    operand is 1e5 larger there, so both halves weigh alike in the products compared."""
    g = torch.Generator().manual_seed(0)
    x, grad = torch.randn(8, 32, generator=g), torch.randn(8, 24, generator=g)
    w_row, w_column = torch.randn(24, 32, generator=g), torch.randn(24, 32, generator=g)
    x[:, 16:] *= 1e-5  # the second rank's input features are small in x, large in w_row
    w_row[:, 16:] *= 1e5
    grad[:, 12:] *= 1e-5  # the second rank's output features are small in the gradient, large in w_column
    w_column[12:] *= 1e5
    results = run_ranks(run_fp8_linears, 2, x, w_row, w_column, grad)
    for cut, w, dim in (("row", w_row, -1), ("column", w_column, 0)):
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8_linear(xr, wr)
        y.backward(grad)
        for rank, out in enumerate(results):
            got_y, got_dx, got_dw = out[cut]
            want_y = y.detach() if cut == "row" else y.detach().chunk(2, -1)[rank]
            want_dx = xr.grad.chunk(2, -1)[rank] if cut == "row" else xr.grad
            for name, a, b in (("y", got_y, want_y), ("grad_x", got_dx, want_dx),
                               ("grad_w", got_dw, wr.grad.chunk(2, dim)[rank])):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()),
                                           msg=lambda m, c=cut, n=name, r=rank: f"{c} rank {r} {n}: {m}")


# The communication ops: forward and backward against their definitions ------------------------

OPS = {  # name: (op, forward of all ranks' x, backward of all ranks' upstream grads), per rank r
    "copy_to_tp": (mappings.copy_to_tp, lambda x, r: x[r], lambda g, r: sum(g)),
    "reduce_from_tp": (mappings.reduce_from_tp, lambda x, r: sum(x), lambda g, r: g[r]),
    "reduce_for_sharded": (mappings.reduce_for_sharded, lambda x, r: sum(x), lambda g, r: sum(g)),
    "scatter_to_tp": (mappings.scatter_to_tp, lambda x, r: x[r].chunk(2, -1)[r],
                      lambda g, r: torch.cat(g, -1)),
    "gather_from_tp": (mappings.gather_from_tp, lambda x, r: torch.cat(x, -1),
                       lambda g, r: g[r].chunk(2, -1)[r]),
    "scatter_to_sp": (mappings.scatter_to_sp, lambda x, r: x[r].chunk(2, 1)[r], lambda g, r: torch.cat(g, 1)),
    "gather_from_sp": (mappings.gather_from_sp, lambda x, r: torch.cat(x, 1),
                       lambda g, r: sum(g).chunk(2, 1)[r]),
    "reduce_scatter_to_sp": (mappings.reduce_scatter_to_sp, lambda x, r: sum(x).chunk(2, 1)[r],
                             lambda g, r: torch.cat(g, 1)),
}


def _input(rank: int) -> torch.Tensor:
    return torch.randn(2, 4, 6, generator=torch.Generator().manual_seed(rank))  # [B, S, d]


def _upstream(rank: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank))


def run_ops(rank: int, world_size: int) -> dict:
    """Each op on this rank's input; returns {name: (output, input grad)}."""
    out = {}
    for name, (op, _, _) in OPS.items():
        x = _input(rank).requires_grad_()
        y = op(x, dist.group.WORLD)
        y.backward(_upstream(rank, y.shape))
        out[name] = (y.detach(), x.grad)
    return out


def test_mappings_are_conjugate_pairs():
    results = run_ranks(run_ops, 2)
    xs = [_input(r) for r in range(2)]
    for name, (_, forward, backward) in OPS.items():
        for r, result in enumerate(results):
            y, grad = result[name]
            torch.testing.assert_close(y, forward(xs, r), msg=f"{name} forward, rank {r}")
            gs = [_upstream(s, y.shape) for s in range(2)]
            torch.testing.assert_close(grad, backward(gs, r), msg=f"{name} backward, rank {r}")


def test_the_tp2_cross_entropy_is_the_cross_entropy_of_gathered_logits():
    """Under TP2 the trainer's cross-entropy (`cross_entropy_for`) is the vocab-parallel one: from
    vocab-local logits [B, S, V/2] it gives the summed cross-entropy over the targets of the whole
    logits, and this rank's columns of its gradient."""
    results = run_ranks(run_cross_entropy, 2)
    logits, labels = _logits_and_labels()
    full = logits.clone().requires_grad_()
    want = F.cross_entropy(full.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    want.backward()
    for r, (loss, grad) in enumerate(results):
        torch.testing.assert_close(loss, want.detach())
        torch.testing.assert_close(grad, full.grad.chunk(2, -1)[r])
    torch.testing.assert_close(cross_entropy(logits, labels), want.detach())  # the 1-rank one
    assert cross_entropy_for(ParallelState(1, 0)) is cross_entropy


def _logits_and_labels():
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 10, (3, 4), generator=g)
    labels.view(-1)[::5] = -100
    return torch.randn(3, 4, 10, generator=g) * 3, labels


def run_cross_entropy(rank: int, world_size: int) -> tuple:
    state = ParallelState(world_size, rank, tp=world_size).build_groups()
    logits, labels = _logits_and_labels()
    local = logits.chunk(world_size, -1)[rank].clone().requires_grad_()
    loss = cross_entropy_for(state)(local, labels)
    loss.backward()
    return loss.detach(), local.grad


# The helper: a failing rank fails the test with its traceback, a hung one times out -----------

def fail_on_rank_one(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("rank one is broken")
    dist.barrier()  # never completes: rank 1 is gone
    return rank


def sleep_long(rank: int, world_size: int) -> None:
    import time
    time.sleep(60)


def test_run_ranks_reports_the_failing_rank_and_timeouts():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed.*ValueError: rank one is broken"):
        run_ranks(fail_on_rank_one, 2, timeout=60)
    with pytest.raises(RankFailed, match=r"did not finish within 1s"):
        run_ranks(sleep_long, 2, timeout=1)



def _bookkeeping_all_reduce(rank, world_size):
    from megamoe.parallel import comm
    pair = dist.new_group([0, 1])
    singles = [dist.new_group([r]) for r in range(world_size)]  # every rank creates every group
    base = torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * rank
    summed = comm.all_reduce(base[1], pair) if rank < 2 else None  # a view of the input
    peak = comm.all_reduce(torch.tensor([rank]), None, op=dist.ReduceOp.MAX)
    own = comm.all_reduce(base, singles[rank])
    return {"summed": summed, "base": base, "peak": peak, "own_is_input": own is base}


def test_bookkeeping_all_reduce_copies_reduces_and_returns_where_the_input_was():
    """comm.all_reduce, which the trainer's logged sums, loads and grad norms go through: a
    reduced copy over a subgroup, the input untouched, a group of one rank a no-op."""
    results = run_ranks(_bookkeeping_all_reduce, 3)
    for rank, r in enumerate(results):
        if rank < 2:
            torch.testing.assert_close(r["summed"], torch.tensor([16.0, 18.0, 20.0], dtype=torch.float64))
            assert r["summed"].device.type == "cpu"
        assert torch.equal(r["base"], torch.arange(6, dtype=torch.float64).view(2, 3) + 10 * rank)
        assert r["peak"].tolist() == [2] and r["own_is_input"]
