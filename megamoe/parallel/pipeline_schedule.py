"""Pipeline parallelism, the run: a 1F1B schedule drives the stages `pipeline.py` cut.

`train_step` runs one optimizer step's micro-batches through the pipeline in the one-forward-
one-backward order (PipeDream-flush, as Megatron's non-interleaved schedule): stage r first runs
`pp - r - 1` forwards, then alternates forward and backward, then drains the backwards, so at
most `pp - r` micro-batches' activations are alive on it. Activations [mbs, seq, d] (seq/tp
under sequence parallelism) go forward and their gradients backward by point-to-point send/recv
over the pipeline group; a send and a receive that happen at the same point are posted together
(`batch_isend_irecv`), so no stage waits on a send its peer cannot yet take.

The trainer owns the loss: it passes `lm_loss(logits, labels)`, which the last stage applies.
Gradients equal the 1-rank model's: the last stage backs `(lm_loss + aux) / gas` (DeepSpeed
divides by the accumulation steps), an earlier stage backs Σ(h_out · grad_from_next) +
aux_this_stage / gas without further scaling. Every stage's MoE auxiliary losses thus reach the
total loss; every stage adds its statistics to the trainer's `StepStats`, which sums them over
the pipeline group when the step is read.
"""

from collections import deque
from collections.abc import Callable

import torch
import torch.distributed as dist

from ..config import Config
from . import comm
from .state import ParallelState

Batches = Callable[[int], tuple[dict, torch.Tensor]]  # micro index -> (the model's inputs, labels)
LMLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, labels) -> LM loss


class _Pipe:
    """This stage's view of its pipeline: neighbours, activation shape, and the p2p exchanges."""

    def __init__(self, engine, state: ParallelState, cfg: Config):
        self.engine, self.state = engine, state
        self.gas = engine.gradient_accumulation_steps()
        seq = cfg.data.seq_length // (state.tp if cfg.parallel.sequence_parallel else 1)
        self.shape = (cfg.train.micro_batch_size, seq, cfg.model.d_model)
        param = next(engine.module.parameters())
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

    def forward(self, inputs: dict, h_in):
        """This stage's forward of one micro-batch (`inputs`: the model's keyword arguments, `tokens` and
        perhaps `documents`); h_in is None on the first stage. The Output's `logits` are the blocks'
        output [mbs, seq, d] on a stage before the last."""
        if h_in is not None and torch.is_grad_enabled():
            h_in.requires_grad_(True)
        return self.engine(**inputs, hidden=h_in)


def train_step(engine, state: ParallelState, cfg: Config, batches: Batches, lm_loss: LMLoss, stats) -> None:
    """One optimizer step of 1F1B over `gas` micro-batches; each forward's statistics go to
    `stats` (a `megamoe.train.stats.StepStats`)."""
    pipe = _Pipe(engine, state, cfg)
    gas, last = pipe.gas, state.is_last_stage
    warmup = min(state.pp - state.pp_rank - 1, gas)
    in_flight = deque()  # (h_in, out, lm loss) of micro-batches whose backward is still to come
    # engine.step() follows each backward (it steps the optimizer only at the accumulation
    # boundary), after the gradient is sent on: the step all-reduces the gradient norm over
    # the pipeline, which the previous stage joins only after its own last backward.

    def forward(micro: int, h_in):
        inputs, labels = batches(micro)
        out = pipe.forward(inputs, h_in)
        lm = lm_loss(out.logits, labels) if last else None
        stats.add(out.aux_loss, lm)
        in_flight.append((h_in, out, lm))
        return None if last else out.logits

    def step():  # the optimizer steps at the last one; a non-finite loss skips it, as without PP
        if hasattr(engine.optimizer, "also_finite"):
            engine.optimizer.also_finite = stats.loss()
        engine.step()

    def backward(grad_out):
        h_in, out, lm = in_flight.popleft()
        if last:
            engine.backward(lm + out.aux_loss)
        else:
            surrogate = (out.logits * grad_out).sum() + out.aux_loss / gas
            engine.backward(surrogate, scale_wrt_gas=False)
        return h_in.grad if h_in is not None else None

    for micro in range(warmup):
        h_in, _ = pipe.exchange(recv_prev=True)
        pipe.exchange(send_next=forward(micro, h_in))
    h_in = pipe.exchange(recv_prev=True)[0] if warmup < gas else None
    for micro in range(warmup, gas):
        _, grad_out = pipe.exchange(send_next=forward(micro, h_in), recv_next=True)
        h_in, _ = pipe.exchange(send_prev=backward(grad_out), recv_prev=micro + 1 < gas)
        step()
    for _ in range(warmup):
        _, grad_out = pipe.exchange(recv_next=True)
        pipe.exchange(send_prev=backward(grad_out))
        step()


@torch.no_grad()
def forward_only(engine, state: ParallelState, cfg: Config, tokens: torch.Tensor,
                 documents: torch.Tensor | None = None):
    """One micro-batch [mbs, seq] forward through every stage (attention within `documents` when given):
    the last stage's Output, else None."""
    pipe = _Pipe(engine, state, cfg)
    h_in, _ = pipe.exchange(recv_prev=True)
    out = pipe.forward({"tokens": tokens, "documents": documents}, h_in)
    if not state.is_last_stage:
        pipe.exchange(send_next=out.logits)
        return None
    return out


@torch.no_grad()
def eval_lm_loss(engine, state: ParallelState, cfg: Config, batches: Batches, lm_loss: LMLoss) -> torch.Tensor:
    """Σ over `gas` micro-batches of the LM loss, forward only through the pipeline: fp64 [1] on
    the model's device, equal on every stage."""
    total = torch.zeros(1, dtype=torch.float64, device=next(engine.module.parameters()).device)
    for micro in range(engine.gradient_accumulation_steps()):
        inputs, labels = batches(micro)
        out = forward_only(engine, state, cfg, **inputs)
        if out is not None:
            total += lm_loss(out.logits, labels).double()
    return comm.all_reduce(total, state.pp_group)
