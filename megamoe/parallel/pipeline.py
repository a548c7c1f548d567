"""Pipeline parallelism: each stage holds a contiguous run of blocks; a 1F1B schedule drives them.

`apply_pipeline` cuts an OLMoE in place to this stage's blocks (keys of `model.layers` stay the
global layer indices, so parameter names stay canonical), the embedding on the first stage and
the final norm and LM head on the last.

`train_step` runs one optimizer step's micro-batches through the pipeline in the one-forward-
one-backward order (PipeDream-flush, as Megatron's non-interleaved schedule): stage r first runs
`pp - r - 1` forwards, then alternates forward and backward, then drains the backwards, so at
most `pp - r` micro-batches' activations are alive on it. Activations [mbs, seq, d] (seq/tp
under sequence parallelism) go forward and their gradients backward by point-to-point send/recv
over the pipeline group; a send and a receive that happen at the same point are posted together
(`batch_isend_irecv`), so no stage waits on a send its peer cannot yet take.

Gradients equal the 1-rank model's: the last stage backs `loss / gas` (DeepSpeed divides by the
accumulation steps), an earlier stage backs  Σ(h_out · grad_from_next) + aux_this_stage / gas
without further scaling. Every stage's MoE auxiliary losses thus reach the total loss, and
their logged values are summed over the pipeline group.
"""

from collections import deque
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config
from . import comm
from .state import ParallelState

Batches = Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # micro index -> (tokens, labels)


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
        model.embed = None
    if not state.is_last_stage:
        model.norm = model.lm_head = None
    return model


class _Pipe:
    """This stage's view of its pipeline: neighbours, activation shape, and the p2p exchanges."""

    def __init__(self, engine, state: ParallelState, cfg: Config):
        self.engine, self.state = engine, state
        self.model = engine.module
        self.gas = engine.gradient_accumulation_steps()
        seq = cfg.data.seq_length // (state.tp if cfg.parallel.sequence_parallel else 1)
        self.shape = (cfg.train.micro_batch_size, seq, cfg.model.d_model)
        param = next(self.model.parameters())
        self.dtype, self.device = param.dtype, param.device
        r = state.pp_rank
        self.prev = None if state.is_first_stage else state.pp_ranks[r - 1]
        self.next = None if state.is_last_stage else state.pp_ranks[r + 1]

    def exchange(self, send_next=None, send_prev=None, recv_next=False, recv_prev=False):
        """Post the given sends and receives together, wait for all; returns (from_prev, from_next).
        Sends and receives toward a missing neighbour (first/last stage) are skipped."""
        ops, got = [], {}
        for tensor, peer in ((send_next, self.next), (send_prev, self.prev)):
            if tensor is not None and peer is not None:
                ops.append(dist.P2POp(dist.isend, tensor.detach().contiguous(), peer, self.state.pp_group))
        for wanted, peer in ((recv_prev, self.prev), (recv_next, self.next)):
            if wanted and peer is not None:
                got[peer] = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, got[peer], peer, self.state.pp_group))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return got.get(self.prev), got.get(self.next)

    def forward(self, tokens, labels, h_in):
        """This stage's forward of one micro-batch; h_in is None on the first stage."""
        if h_in is not None and torch.is_grad_enabled():
            h_in.requires_grad_(True)
        return self.engine(tokens, labels, hidden=h_in)


class _Stats:
    """Per-step sums of what the trainer logs, over micro-batches and (after `reduce`) stages."""

    def __init__(self, cfg: Config, model: nn.Module):
        self.model = model
        self.n_moe = len(cfg.moe_layer_ids())
        self.sums = torch.zeros(4, dtype=torch.float64)  # aux, lm_loss, Σ_layers lb, Σ_layers z
        self.load = torch.zeros(self.n_moe, cfg.moe.num_experts or 1, dtype=torch.float64)

    def add(self, out) -> None:
        lm = out.lm_loss.item() if out.lm_loss is not None else 0.0
        self.sums += torch.tensor([out.aux_loss.item(), lm, 0.0, 0.0], dtype=torch.float64)
        if not self.n_moe:
            return
        for row, ffn in self.model.moe_rows().items():  # row: the layer's place among all MoE layers
            st = ffn.stats
            self.sums[2:] += torch.tensor([st["lb_loss"].item(), st["z_loss"].item()], dtype=torch.float64)
            self.load[row] += st["expert_load"].double().cpu()

    def reduce(self, group) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, lm_loss, mean lb, mean z) summed over micro-batches, and the [layers, E] load."""
        self.sums, self.load = comm.all_reduce(self.sums, group), comm.all_reduce(self.load, group)
        aux, lm, lb, z = self.sums.tolist()
        n = max(self.n_moe, 1)
        return torch.tensor([lm + aux, lm, lb / n, z / n], dtype=torch.float64), self.load


def train_step(engine, state: ParallelState, cfg: Config, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of 1F1B over `gas` micro-batches; returns the step's logged sums over
    micro-batches (loss, lm_loss, lb, z) and expert loads [layers, E], equal on every stage."""
    pipe = _Pipe(engine, state, cfg)
    stats = _Stats(cfg, pipe.model)
    gas, last = pipe.gas, state.is_last_stage
    warmup = min(state.pp - state.pp_rank - 1, gas)
    in_flight = deque()  # (h_in, out) of micro-batches whose backward is still to come
    # engine.step() follows each backward (it steps the optimizer only at the accumulation
    # boundary), after the gradient is sent on: the step all-reduces the gradient norm over
    # the pipeline, which the previous stage joins only after its own last backward.

    def forward(micro: int, h_in):
        out = pipe.forward(*batches(micro), h_in)
        stats.add(out)
        in_flight.append((h_in, out))
        return out.hidden  # None on the last stage

    def backward(grad_out):
        h_in, out = in_flight.popleft()
        if last:
            engine.backward(out.loss)
        else:
            surrogate = (out.hidden * grad_out).sum() + out.aux_loss / gas
            engine.backward(surrogate, scale_wrt_gas=False)
        return h_in.grad if h_in is not None else None

    for micro in range(warmup):
        h_in, _ = pipe.exchange(recv_prev=True)
        pipe.exchange(send_next=forward(micro, h_in))
    h_in = pipe.exchange(recv_prev=True)[0] if warmup < gas else None
    for micro in range(warmup, gas):
        _, grad_out = pipe.exchange(send_next=forward(micro, h_in), recv_next=True)
        h_in, _ = pipe.exchange(send_prev=backward(grad_out), recv_prev=micro + 1 < gas)
        engine.step()
    for _ in range(warmup):
        _, grad_out = pipe.exchange(recv_next=True)
        pipe.exchange(send_prev=backward(grad_out))
        engine.step()
    return stats.reduce(state.pp_group)


@torch.no_grad()
def forward_only(engine, state: ParallelState, cfg: Config, tokens: torch.Tensor, labels: torch.Tensor | None):
    """One micro-batch [mbs, seq] forward through every stage: the last stage's Output, else None."""
    pipe = _Pipe(engine, state, cfg)
    h_in, _ = pipe.exchange(recv_prev=True)
    out = pipe.forward(tokens, labels, h_in)
    pipe.exchange(send_next=out.hidden)
    return out if state.is_last_stage else None


@torch.no_grad()
def eval_lm_loss(engine, state: ParallelState, cfg: Config, batches: Batches) -> float:
    """Σ over `gas` micro-batches of the LM loss, forward only through the pipeline (all stages)."""
    total = torch.zeros(1, dtype=torch.float64)
    for micro in range(engine.gradient_accumulation_steps()):
        out = forward_only(engine, state, cfg, *batches(micro))
        if out is not None:
            total += out.lm_loss.item()
    return comm.all_reduce(total, state.pp_group).item()
