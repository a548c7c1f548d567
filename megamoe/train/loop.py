"""The training loop: steps, evaluation, logging, checkpoints and preemption.

One optimizer step = `grad_accumulation_steps` micro-batches per data-parallel rank; the
micro-batch each rank reads is a pure function of (step, rank, micro-step), so a resumed run
reads exactly the samples it would have read had it never stopped.
"""

import math
import time
from contextlib import contextmanager
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist

from ..analysis.load import step_load_metrics
from ..checkpoint.io import CheckpointWriter, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from ..config import Config, ConfigError
from ..data.dataset import build_datasets, check_data, get_batch
from ..distributed import discover_env, init_distributed
from ..eval.training import TrainingEvaluator
from ..model.flops import flops_per_token, peak_flops
from ..moe.router import update_expert_bias
from ..parallel import comm, pipeline
from ..parallel.state import ParallelState
from .engine import build_engine, build_model, lr_at, resolve_device, resolve_dtype
from .metrics import MetricsLogger
from .rundir import RunLock, check_resumable, prepare_run_dir
from .signals import EXIT_REQUEUE, PreemptionHandler


class Trainer:
    def __init__(self, cfg: Config, lock: RunLock):
        """`lock` (on cfg.run.dir) is taken by rank 0 here; the caller releases it at the end."""
        env = discover_env()
        cfg.validate(env.world_size)  # every layout error before any process group exists
        check_data(cfg.data, cfg.model.vocab_size)  # and every data error
        init_distributed(env, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        self.cfg = cfg
        self.state = ParallelState(env.world_size, env.rank, cfg.parallel.tensor,
                                   cfg.parallel.pipeline, cfg.parallel.expert).build_groups()
        self.is_logger = env.rank == 0
        self.run_dir = _rank0_then_all(lambda: prepare_run_dir(cfg, lock))
        self.device = resolve_device(cfg)
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        self.gas = cfg.grad_accumulation_steps(env.world_size)
        self.train_data, self.valid_data, self.tokenizer = build_datasets(
            cfg.data, t.seed, t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size,
            cfg.model.vocab_size)
        self.tasks = TrainingEvaluator(cfg, self.state, self.tokenizer)  # train.eval_tasks, read now
        self.model = build_model(cfg, self.state)
        self.engine = build_engine(cfg, self.state, self.model, self.device)
        self.step = 0
        self.skipped_steps = self.skipped_in_a_row = 0  # divergence guard (`_guard`)
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        if latest is not None:
            check_resumable(read_meta(latest)["config"], cfg, latest)
            self.step = load_checkpoint(latest, self.model, self.engine.optimizer, self.state)["step"]
        self.checkpoints = CheckpointWriter(self.run_dir / "checkpoints", env.rank, env.world_size,
                                            t.keep_checkpoints, self.step, t.async_save, t.collective_timeout_s)
        self.metrics = MetricsLogger(self.run_dir, t.steps, self.is_logger, cfg.run.tensorboard)
        if self.is_logger:
            n = sum(p.numel() for p in self.model.parameters())
            print(f"megamoe: {self.state.describe()} | {n / 1e6:.2f}M params on rank 0 | "
                  f"{'resuming at step ' + str(self.step) if self.step else 'new run'} in {self.run_dir}",
                  flush=True)

    # -------------------------------------------------------------------------------------
    def _micro_batch(self, data, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        t, s = self.cfg.train, self.state
        batch = get_batch(data, step, t.global_batch_size, t.micro_batch_size, s.dp_rank, s.dp, micro)
        tokens, labels = batch[:, :-1], batch[:, 1:]  # [mbs, seq]
        if data.has_loss_mask:  # fine-tuning data: only marked tokens are targets
            mask = get_batch(data, step, t.global_batch_size, t.micro_batch_size, s.dp_rank, s.dp,
                             micro, loss_mask=True)
            labels = labels.masked_fill(~mask[:, 1:], -100)
        return tokens.to(self.device), labels.to(self.device)

    def _count_targets(self, data, step: int, batches: int) -> float:
        """Targets (labels != -100) in `batches` micro-batches of `step` over the DP group: the
        whole step's, read from the data alone (no forward pass)."""
        t, s = self.cfg.train, self.state
        count = sum(int(get_batch(data, step, t.global_batch_size, t.micro_batch_size, s.dp_rank, s.dp, m,
                                  loss_mask=True)[:, 1:].sum()) for m in range(batches))  # the labels' mask
        return float(comm.all_reduce(torch.tensor([count], dtype=torch.float64), self.state.dp_group))

    @contextmanager
    def _per_target_loss(self, data, step: int, batches: int, scale: int):
        """Loss-masked data: each micro-batch's lm_loss is its sum over targets × `scale` / the
        step's target count, so every target weighs the same whatever the split into micro-
        batches and ranks (DeepSpeed then averages over both: scale = micro-batches × DP).
        Without loss masks, the mean per micro-batch is the same thing and nothing changes."""
        if not data.has_loss_mask:
            yield
            return
        self.model.loss_denominator = max(self._count_targets(data, step, batches), 1.0) / scale
        try:
            yield
        finally:
            self.model.loss_denominator = None

    def train_step(self) -> dict:
        """One optimizer step; returns the step's metrics (averaged over micro-batches and DP)."""
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg, self.step)
        layers = self.model.moe_layers()
        with self._per_target_loss(self.train_data, self.step, self.gas, self.gas * self.state.dp):
            if self.state.pp > 1:  # 1F1B over the micro-batches; sums and loads of every stage
                sums, load = pipeline.train_step(self.engine, self.state, self.cfg,
                                                 partial(self._micro_batch, self.train_data, self.step))
            else:
                sums, load = self._accumulate(layers)
        sums = _all_reduce_mean(sums / self.gas, self.state.dp_group).cpu()
        load = comm.all_reduce(load, self.state.dp_group)
        if self.cfg.parallel.sequence_parallel:  # each TP rank routed its own sequence chunk
            load = comm.all_reduce(load, self.state.tp_group)
        load = load.cpu()
        skipped = bool(getattr(self.engine.optimizer, "overflow", False))
        routing = self._after_optimizer_step(load, update_bias=not skipped)
        self.step += 1
        norm = self.engine.get_global_grad_norm()
        self._guard(skipped)
        return {"loss": sums[0].item(), "lm_loss": sums[1].item(), "lb_loss": sums[2].item(),
                "z_loss": sums[3].item(), "lr": lr_at(self.cfg, self.step - 1),
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "skipped_steps": self.skipped_steps,
                "expert_load": ((load / load.sum(-1, keepdim=True).clamp_min(1)).tolist()
                                if self.cfg.moe_layer_ids() else []), **routing}

    def _after_optimizer_step(self, load: torch.Tensor, update_bias: bool) -> dict:
        """Aux-loss-free balancing: move the routers' expert biases by the step's loads [MoE layers, E],
        summed over every rank (so identical on every rank), unless the divergence guard skipped the
        step. Returns the step's load metrics."""
        moe, routers = self.cfg.moe, {row: ffn.router for row, ffn in self.model.moe_rows().items()
                                      if hasattr(ffn, "router")}
        if moe.bias_update_rate and update_bias:
            update_expert_bias(routers, load, moe.bias_update_rate)
        if not self.cfg.moe_layer_ids():
            return {}
        drops = moe.capacity_factor is not None and moe.routing == "token_choice" and moe.backend == "megamoe"
        routed = self.cfg.train.global_batch_size * self.cfg.data.seq_length * moe.top_k if drops else None
        bias = None
        if moe.bias_update_rate:  # every stage's routers, for the logging rank
            bias = torch.zeros(load.shape, dtype=torch.float32)
            for row, router in routers.items():
                bias[row] = router.expert_bias.cpu()
            bias = comm.all_reduce(bias, self.state.pp_group) if self.state.pp > 1 else bias
        return step_load_metrics(load, routed, bias)

    def _guard(self, skipped: bool) -> None:
        """Divergence guard: the optimizer left a step whose gradient norm (or loss) was not
        finite undone; count it, and stop after `train.max_skipped_steps` in a row."""
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        if self.is_logger:
            print(f"megamoe: step {self.step} skipped: its gradient norm or loss is not finite; weights and "
                  f"optimizer state unchanged ({self.skipped_in_a_row} in a row, limit {limit})", flush=True)
        if self.skipped_in_a_row >= limit:
            raise DivergenceError(
                f"{self.skipped_in_a_row} steps in a row (to step {self.step}) had a non-finite gradient norm "
                f"or loss and were skipped (train.max_skipped_steps={limit}); the run has diverged. The last "
                "checkpoint holds finite weights: resume from it with a lower optim.lr, more "
                "optim.warmup_steps or a tighter optim.grad_clip")

    def _accumulate(self, layers) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward and backward over the step's micro-batches (no pipeline) → the sums of
        (loss, lm_loss, mean lb, mean z) and the expert loads [layers, E]. Summed where the
        model runs and read once per step: one host sync, not one per micro-batch and layer."""
        sums, load = None, None
        for micro in range(self.gas):
            tokens, labels = self._micro_batch(self.train_data, self.step, micro)
            out = self.engine(tokens, labels)
            self.engine.backward(out.loss)
            micro_sums = torch.stack([out.loss.detach().float(), out.lm_loss.detach().float(),
                                      _layer_mean(layers, "lb_loss", out.loss),
                                      _layer_mean(layers, "z_loss", out.loss)]).double()
            sums = micro_sums if sums is None else sums + micro_sums
            if micro == self.gas - 1 and hasattr(self.engine.optimizer, "also_finite"):
                self.engine.optimizer.also_finite = sums[0]  # a non-finite loss skips the step too
            self.engine.step()  # steps the optimizer after the last micro-batch only
            if layers:
                micro_load = torch.stack([l.stats["expert_load"].double() for l in layers])
                load = micro_load if load is None else load + micro_load
        if load is None:
            load = torch.zeros(0, 1, dtype=torch.float64)
        return sums, load

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.device)  # read once, at the end
        for i in range(self.cfg.train.eval_batches):  # each batch: the mean over its targets
            with self._per_target_loss(self.valid_data, i, self.gas, self.gas * self.state.dp):
                if self.state.pp > 1:
                    total += pipeline.eval_lm_loss(self.engine, self.state, self.cfg,
                                                   partial(self._micro_batch, self.valid_data, i))
                    continue
                for micro in range(self.gas):
                    tokens, labels = self._micro_batch(self.valid_data, i, micro)
                    total += self.engine(tokens, labels).lm_loss.double()
        tasks = self.tasks(self.engine, self.device)
        self.model.train()
        loss = _all_reduce_mean(total / (self.cfg.train.eval_batches * self.gas), self.state.dp_group).item()
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)), **tasks}

    def save(self) -> None:
        save_checkpoint(self.checkpoints, self.step, self.model, self.engine.optimizer, self.state,
                        {"config": self.cfg.to_dict()})

    def fit(self) -> int:
        """Train to `train.steps`; returns the process exit code (EXIT_REQUEUE when preempted)."""
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_length
        # Model FLOPs of a step per rank (= per GPU), and this GPU's bf16 peak for the MFU.
        flops_per_rank = tokens_per_step * flops_per_token(self.cfg, self.cfg.data.seq_length) / self.state.world_size
        peak = peak_flops(self.device, resolve_dtype(self.cfg, self.device))
        self.model.train()
        try:
            with PreemptionHandler() as preempt:
                while self.step < t.steps:
                    start = time.perf_counter()
                    record = self.train_step()
                    elapsed = time.perf_counter() - start
                    record = {"step": self.step, **record, "tokens_per_sec": tokens_per_step / elapsed,
                              "step_time_ms": 1000 * elapsed, "tflops_per_rank": flops_per_rank / elapsed / 1e12}
                    if peak:
                        record["mfu"] = flops_per_rank / elapsed / peak
                    if self.step % t.eval_interval == 0 or self.step == t.steps:
                        record.update(self.evaluate())
                    if self.step % t.log_interval == 0 or self.step == t.steps or "eval_loss" in record:
                        self.metrics.log(record)
                    if self.step % t.save_interval == 0 or self.step == t.steps:
                        self.save()
                    if preempt.should_stop():
                        if self.step % t.save_interval and self.step != t.steps:
                            self.save()
                        if self.is_logger:
                            by = preempt.received.name if preempt.received else "a peer"
                            print(f"megamoe: preempted by {by}; checkpoint at step {self.step} saved, "
                                  f"exiting {EXIT_REQUEUE} to be requeued", flush=True)
                        self.checkpoints.wait()
                        return EXIT_REQUEUE
            self.checkpoints.wait()  # the last checkpoint is published before the run reports success
            return 0
        except DivergenceError:  # every rank stops at the same step: finish the (finite) saves in flight
            self.checkpoints.wait()
            raise
        finally:
            self.metrics.close()  # also on preemption and errors: tensorboard flushes what it has


class DivergenceError(RuntimeError):
    """Too many consecutive steps had a non-finite gradient norm or loss."""


def _layer_mean(layers, key: str, like: torch.Tensor) -> torch.Tensor:
    """Mean over MoE layers of one logged statistic, on the model's device (0 without layers)."""
    if not layers:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    return torch.stack([l.stats[key] for l in layers]).float().mean()


def _all_reduce_mean(t: torch.Tensor, group) -> torch.Tensor:
    return comm.all_reduce(t, group) / (dist.get_world_size(group) if dist.is_initialized() else 1)


def _rank0_then_all(fn):
    """Run fn on rank 0 only; every rank returns its result or raises its ConfigError."""
    box = [None, None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            box[0] = fn()
        except ConfigError as e:
            box[1] = str(e)
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise ConfigError(box[1])
    return box[0]
