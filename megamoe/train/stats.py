"""The statistics a training step logs, summed where they are computed and read once per step.

One `StepStats` serves the plain and the pipeline paths. After each micro-batch's forward it
adds, on the model's device and without a host sync, the micro-batch's auxiliary loss, its LM
loss (where this stage has logits) and what this stage's MoE layers kept of their routing (lb
and z losses, expert loads). `read` sums over pipeline stages, averages over data parallelism
and copies the result to the host once.
"""

import functools

import torch
from torch import nn

from ..config import Config
from ..parallel import comm
from ..parallel.state import ParallelState


@functools.lru_cache(maxsize=8)
def _rows(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The rows as a device tensor, made once: a tensor built from a list copies it from pageable
    host memory, which waits for everything queued on the GPU (a host sync every step)."""
    return torch.tensor(rows, dtype=torch.long, device=device)


class StepStats:
    def __init__(self, cfg: Config, model: nn.Module, device: torch.device):
        rows = model.moe_rows()  # {row among all the model's MoE layers: this stage's FFN}
        self.ffns = list(rows.values())
        self.rows = _rows(tuple(rows), device)
        self.n_moe = len(cfg.moe_layer_ids())
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # aux, lm, Σ_layers lb, Σ_layers z
        self.load = torch.zeros(self.n_moe, cfg.moe.num_experts or 1, dtype=torch.float64, device=device)

    def add(self, aux_loss: torch.Tensor, lm_loss: torch.Tensor | None) -> None:
        """One micro-batch after its forward on this stage: its aux loss, its LM loss (None on a
        stage before the last) and the routing statistics its MoE layers kept."""
        lm = self.sums.new_zeros(()) if lm_loss is None else lm_loss.detach().double()
        lb_z = self.sums.new_zeros(2)
        if self.ffns:
            stats = [ffn.stats for ffn in self.ffns]
            lb_z = torch.stack([torch.stack([s["lb_loss"], s["z_loss"]]) for s in stats]).double().sum(0)
            self.load.index_add_(0, self.rows, torch.stack([s["expert_load"] for s in stats]).double())
        self.sums += torch.cat([torch.stack([aux_loss.detach().double(), lm]), lb_z])

    def loss(self) -> torch.Tensor:
        """This rank's Σ over micro-batches of (LM loss + aux loss), on the device."""
        return self.sums[0] + self.sums[1]

    def reduced(self, state: ParallelState, gas: int, sequence_parallel: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The step's sums (means over micro-batches and DP ranks) and its expert loads [MoE layers,
        E] summed over every rank, on the device (collectives queued, nothing read)."""
        sums, load = self.sums, self.load
        if state.pp > 1:  # every stage's aux losses and MoE layers
            sums, load = comm.all_reduce(sums, state.pp_group), comm.all_reduce(load, state.pp_group)
        sums = comm.all_reduce(sums / gas, state.dp_group) / state.dp
        load = comm.all_reduce(load, state.dp_group)
        if sequence_parallel:  # each TP rank routed its own sequence chunk
            load = comm.all_reduce(load, state.tp_group)
        return sums, load

    def start_read(self, state: ParallelState, gas: int, sequence_parallel: bool,
                   extra: list[torch.Tensor] = (), reduced=None) -> "StatsRead":
        """Starts the one copy to the host of the step's statistics (`reduced`, or reduced now) and
        of `extra` (device tensors, flattened), which travels with them."""
        sums, load = reduced or self.reduced(state, gas, sequence_parallel)
        extra = [t.reshape(-1).to(sums) for t in extra]
        return StatsRead(HostCopy(torch.cat([sums, load.flatten(), *extra])), max(self.n_moe, 1), load.shape)

    def read(self, state: ParallelState, gas: int, sequence_parallel: bool,
             extra: list[torch.Tensor] = ()) -> tuple[dict, torch.Tensor, list[float]]:
        """`start_read(...).result()`: the statistics on the host now."""
        return self.start_read(state, gas, sequence_parallel, extra).result()


class HostCopy:
    """A device tensor's values on their way to the host. On CUDA the copy goes to pinned memory
    behind the work queued so far and `values()` waits for it alone (an event), not for work queued
    after it; elsewhere the values are read at once."""

    def __init__(self, t: torch.Tensor):
        t = t.detach()
        self.event = None
        if t.is_cuda:
            self.host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            self.host.copy_(t, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = t.to("cpu", copy=True)

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()
        return self.host.tolist()


class StatsRead:
    """A step's statistics in flight to the host (`StepStats.start_read`)."""

    def __init__(self, copy: HostCopy, n_moe: int, load_shape: torch.Size):
        self.copy, self.n_moe, self.load_shape = copy, n_moe, load_shape

    def result(self) -> tuple[dict, torch.Tensor, list[float]]:
        """The step's logged losses (means over micro-batches and DP ranks, lb and z means over
        MoE layers), its expert loads [MoE layers, E] summed over every rank, and the values of
        `extra` (one flat list), on the host: the step's one read."""
        values = self.copy.values()
        aux, lm, lb, z = values[:4]
        end = 4 + self.load_shape.numel()
        return ({"loss": lm + aux, "lm_loss": lm, "lb_loss": lb / self.n_moe, "z_loss": z / self.n_moe},
                torch.tensor(values[4:end], dtype=torch.float64).view(self.load_shape), values[end:])
