"""AdamW with fp32 master weights, global-norm clipping and a non-finite guard, in one pass.

The optimizer of `parallel.zero_stage: 0` runs (ZeRO 1/2 use DeepSpeed's partitioned one).
Per parameter it keeps an fp32 master weight (when the parameters are trained in bf16) and the
two fp32 Adam moments, so checkpoints read and write them per parameter by name. One step:

1. the global gradient norm: one multi-tensor norm per kind of parameter (replicated, tensor-
   parallel shard, expert shard), summed over the groups that hold distinct pieces;
2. each parameter is updated by one fused pass (`fused_adamw.adamw_step` on CUDA: reads the
   bf16 gradient, master and moments once, writes master, moments and the bf16 weight once;
   the same arithmetic in torch ops elsewhere), the clipping factor folded into the gradient;
3. a step whose norm (or the loss the trainer hands over) is not finite changes nothing: the
   clipping factor and the finite flag are device scalars the update kernels read, so a skipped
   step's kernels read and write nothing, and no host read stands between the backward and the
   update. `settle()` reads the norm and the flag afterwards, sets `overflow` and takes a skipped
   step back out of the step counters. Without `defer_reads`, `step()` calls it before returning;
   with it (the trainer) the two values start their copy to the host behind the update, and the
   step is settled when the trainer asks for its `outcome` or, at the latest, by the next `step()`,
   which waits for that copy alone (the next step's forward and backward may already be queued).
   Offloaded to host memory, the update needs the factor on the host: that step reads first.

Against DeepSpeed's bf16 ZeRO optimizer on one H100 (8 OLMoE layers, 3.56 B parameters) this is
the difference between 236 ms and the memory-traffic bound of the update (docs/performance.md).
"""

import torch
import torch.distributed as dist

from ..deepspeed_adapter import report_grad_norm
from ..parallel import comm
from ..sharding import shards
from . import fused_adamw
from .stats import HostCopy

MOMENTS = ("exp_avg", "exp_avg_sq")


def grad_norm(params: list[torch.Tensor], state) -> torch.Tensor:
    """L2 norm of the *full* model's gradient, whatever the layout (a device scalar, fp64).

    Each distinct gradient element counts once: expert shards are summed over the EP group,
    tensor-parallel shards over the TP group, stages over the PP group; replicas count once.
    """
    kinds = ([], [], [])  # replicated, tp-sharded, expert
    for p in params:
        kinds[2 if getattr(p, "allreduce", True) is False else (1 if shards(p) else 0)].append(p.grad)
    device = params[0].grad.device if params else torch.device("cpu")
    sq = torch.zeros(3, dtype=torch.float64, device=device)
    for i, grads in enumerate(kinds):
        if grads:  # per-tensor norms accumulate in fp32; their squares are summed in fp64
            sq[i] = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double().square().sum()
    if state.tp > 1:
        sq[1:2] = comm.all_reduce(sq[1:2], state.tp_group)
    if state.ep > 1:
        sq[2:3] = comm.all_reduce(sq[2:3], state.ep_group)
    total = sq.sum()
    if state.pp > 1:
        total = comm.all_reduce(total, state.pp_group)
    return total.sqrt()


class AdamW(torch.optim.Optimizer):
    """Decoupled-weight-decay Adam (torch's AdamW arithmetic) over parameters of any dtype."""

    def __init__(self, groups: list[dict], parallel_state, *, lr: float, betas: tuple[float, float],
                 eps: float, max_norm: float, master_weights: bool = False, offload: bool = False):
        """master_weights: keep an fp32 copy of every parameter, taken now (build the optimizer
        over the fp32 initialisation, then cast the parameters to bf16). offload: keep the fp32
        masters and the moments in host memory and update there (`offload.HostAdamW`)."""
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0))
        self.parallel_state, self.max_norm = parallel_state, max_norm
        self.master_weights = master_weights or offload
        self.host = None
        if offload:
            from .offload import HostAdamW
            self.host = HostAdamW(next(p.device for g in self.param_groups for p in g["params"]))
        report_grad_norm(self, None)  # the engine's get_global_grad_norm()
        self.overflow = False  # the last step was skipped (settled; see the module's docstring)
        self.also_finite: torch.Tensor | None = None  # e.g. the step's loss: must be finite too
        self.defer_reads = False  # settle each step later (`outcome`, or the next `step`)
        self._pending = None  # (norm, non-finite flag, states stepped, their HostCopy) of a step not yet settled
        self._settled: tuple[float | None, bool] = (None, False)  # the last settled (norm, skipped)
        self.steps_launched = 0  # step() calls; `outcome` names a step by this count
        self._settled_index = 0
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> dict:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            home = p.device if self.host is None else torch.device("cpu")
            if self.master_weights:
                st["master"] = p.detach().to(home, torch.float32, copy=True).contiguous()
            for k in MOMENTS:
                st[k] = torch.zeros(p.shape, dtype=torch.float32, device=home)
        return st

    # Per-parameter state, for checkpoints -------------------------------------------------
    def master(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 weight the optimizer updates (`p` itself without master weights)."""
        st = self.state.get(p)  # .get: never adds an entry for a tensor the optimizer does not own
        return st["master"] if st and "master" in st else p

    def steps_taken(self) -> int:
        return int(max((float(st["step"]) for st in self.state.values() if "step" in st), default=0))

    @torch.no_grad()
    def load_param_state(self, p: torch.Tensor, master: torch.Tensor, moments: list[torch.Tensor],
                         step: int) -> None:
        st = self._init_state(p)
        p.copy_(master)
        if "master" in st:
            st["master"].copy_(master)
        for k, t in zip(MOMENTS, moments):
            st[k].copy_(t)
        st["step"].fill_(step)

    # The step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        if self._pending is not None:  # the caller did not settle the last step: settle it now
            self.settle()
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        norm = grad_norm(params, self.parallel_state)
        check = norm if self.also_finite is None else norm + 0 * self.also_finite.to(norm)
        # Every rank must take the same decision: a loss is local to its data-parallel rank.
        bad = comm.all_reduce((~torch.isfinite(check)).double().reshape(1), op=dist.ReduceOp.MAX)
        self.also_finite = None
        report_grad_norm(self, None)  # known once settled
        if self.host is not None:  # the host update needs the clipping factor on the host
            self.steps_launched += 1
            self._pending = (norm, bad, [], None)
            norm_value, skipped = self.settle()
            if not skipped:
                self._step_on_host(self._clip_factor(norm_value))
            return
        scale = self._clip_factor(norm)  # fp32 device scalar, as the host's float would round it
        enabled = (bad == 0).float().reshape(())
        stepped = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self._init_state(p)
                st["step"] += 1  # taken back by settle() if the device skipped the step
                stepped.append(st)
                fused_adamw.adamw_step(p, p.grad, st.get("master"), st["exp_avg"], st["exp_avg_sq"],
                                       lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                                       weight_decay=group["weight_decay"], step=int(st["step"]),
                                       grad_scale=scale, enabled=enabled)
        self.steps_launched += 1
        if self.defer_reads:  # on its way to the host behind the update; read at settle()
            self._pending = (norm, bad, stepped, HostCopy(torch.cat([norm.reshape(1), bad.reshape(1)]).double()))
        else:
            self._pending = (norm, bad, stepped, None)
            self.settle()

    def _clip_factor(self, norm):
        """min(1, max_norm / (norm + 1e-6)), in fp64 like the float it replaces: a float for a
        float norm, else an fp32 device scalar (no host read)."""
        if isinstance(norm, float):
            return min(1.0, self.max_norm / (norm + 1e-6)) if self.max_norm > 0 else 1.0
        if self.max_norm <= 0:
            return torch.ones((), dtype=torch.float32, device=norm.device)
        return torch.clamp(norm.new_full((), self.max_norm) / (norm + 1e-6), max=1.0).float()

    def settle(self) -> tuple[float, bool]:
        """The last step's gradient norm and whether it was skipped (read now unless its copy to the
        host is on its way: then waited for). A skipped step leaves the step counters as they
        were; `overflow` and the engine's grad norm are set."""
        if self._pending is None:
            return self._settled
        norm, bad, stepped, copy = self._pending
        values = copy.values() if copy is not None else torch.cat([norm.reshape(1), bad.reshape(1)]).double().tolist()
        self._pending = None
        norm_value, self.overflow = float(values[0]), bool(values[1])
        report_grad_norm(self, norm_value)
        if self.overflow:
            for st in stepped:
                st["step"] -= 1
        self._settled, self._settled_index = (norm_value, self.overflow), self.steps_launched
        return self._settled

    def pending_taken(self) -> torch.Tensor:
        """Whether the step just launched was taken (its norm and loss finite on every rank): a
        device bool scalar, known before anything is read."""
        return self._pending[1].reshape(()) == 0

    def outcome(self, index: int) -> tuple[float, bool]:
        """(gradient norm, skipped) of the `index`-th step (`steps_launched` after it): settles it
        if it is the one pending; the step after it, once launched, has settled it already."""
        if self._pending is not None and self.steps_launched == index:
            return self.settle()
        assert self._pending is None or self.steps_launched == index + 1, (index, self.steps_launched)
        assert self._settled_index == index, (index, self._settled_index)
        return self._settled

    def _step_on_host(self, scale: float) -> None:
        items = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"])
            for p in group["params"]:
                if p.grad is not None:
                    st = self._init_state(p)
                    st["step"] += 1
                    items.append((p, st["master"], st["exp_avg"], st["exp_avg_sq"], dict(hyper, step=st["step"])))
        self.host.step(items, scale)
