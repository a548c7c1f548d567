"""The training loop: steps, evaluation, logging, checkpoints and preemption.

One optimizer step = `grad_accumulation_steps` micro-batches per data-parallel rank; the
micro-batch each rank reads is a pure function of (step, rank, micro-step), so a resumed run
reads exactly the samples it would have read had it never stopped.
"""

import gc
import math
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from functools import partial

import torch
import torch.distributed as dist
from torch.profiler import record_function

from ..analysis.load import step_load_metrics
from ..checkpoint.io import CheckpointWriter, latest_checkpoint, load_checkpoint, read_meta, save_checkpoint
from ..config import Config, ConfigError
from ..data.dataset import build_datasets, check_data, get_batch
from ..distributed import discover_env, init_distributed
from ..eval.training import TrainingEvaluator, load_tasks
from ..model.flops import flops_per_token, peak_flops
from ..moe.experts import cache_fp8_weights, release_fp8_weights
from ..moe.router import update_expert_bias
from ..parallel import comm, pipeline_schedule
from ..parallel.state import ParallelState
from .engine import (build_engine, build_model, check_fp8_device, check_memory, lr_at, resolve_device, resolve_dtype,
                     zero_stage)
from .loss import cross_entropy_for, linear_cross_entropy
from .metrics import MetricsLogger
from .optimizer import AdamW
from .profile import StepProfiler
from .rundir import RunLock, check_init_from, check_resumable, prepare_run_dir
from .signals import EXIT_REQUEUE, PreemptionHandler
from .stats import StatsRead, StepStats


class Trainer:
    def __init__(self, cfg: Config, lock: RunLock):
        """`lock` (on cfg.run.dir) is taken by rank 0 here; the caller releases it at the end."""
        env = discover_env()
        cfg.validate(env.world_size)  # every layout error before any process group exists
        check_data(cfg.data, cfg.model.vocab_size)  # and every data error
        eval_tasks = load_tasks(cfg)  # and every evaluation task's file, before run.dir is touched
        init_from = check_init_from(cfg)  # and the checkpoint a new run starts from
        check_memory(cfg, env.world_size, env.local_world_size, resolve_device(cfg))  # a model that cannot fit
        check_fp8_device(cfg, resolve_device(cfg))  # FP8 experts where they would crawl
        init_distributed(env, timeout=timedelta(seconds=cfg.train.collective_timeout_s))
        self.cfg = cfg
        self.state = ParallelState(env.world_size, env.rank, cfg.parallel.tensor,
                                   cfg.parallel.pipeline, cfg.parallel.expert).build_groups()
        self.is_logger = env.rank == 0
        if self.is_logger and zero_stage(cfg, self.state) != cfg.parallel.zero_stage:
            print(f"megamoe: parallel.zero_stage={cfg.parallel.zero_stage} partitions the optimizer over "
                  f"data-parallel ranks and this run has one: megamoe's own AdamW updates the weights, as at "
                  f"zero_stage=0 (the faster step there; checkpoints resume in any layout)", flush=True)
        self.run_dir = _rank0_then_all(lambda: prepare_run_dir(cfg, lock))
        self.device = resolve_device(cfg)
        torch.manual_seed(cfg.train.seed)
        t = cfg.train
        self.gas = cfg.grad_accumulation_steps(env.world_size)
        self.train_data, self.valid_data, self.tokenizer = build_datasets(
            cfg.data, t.seed, t.steps * t.global_batch_size, t.eval_batches * t.global_batch_size,
            cfg.model.vocab_size)
        self.tasks = TrainingEvaluator(cfg, self.state, self.tokenizer, eval_tasks)
        self.model = build_model(cfg, self.state)
        self.engine = build_engine(cfg, self.state, self.model, self.device)
        opt = self.engine.optimizer
        if isinstance(opt, AdamW):  # its norm and skip flag are read behind the update
            opt.defer_reads = True
        # read each step's statistics after the next step is queued (`_overlaps`)
        self.overlap = t.overlap_read and isinstance(opt, AdamW) and opt.host is None
        # aux-loss-free biases then move on the device, each step's update gated by its finite flag
        self.biases_on_device = self.overlap and bool(cfg.moe.bias_update_rate and cfg.moe_layer_ids())
        self.stop_requested = False  # a rank was signalled to stop (read with a step's statistics)
        # FP8 experts or attention projections over several micro-batches a step: each weight quantized once a
        # step, not once a micro-batch's forward and again in its backward (two bytes a parameter of theirs kept
        # on the device; the attention projections' under one rank of TP only)
        self.fp8_cache = bool(cfg.fp8_keys()) and t.fp8_weight_cache and self.gas > 1
        # the loss of the model's output: vocab-parallel under TP; without TP and PP the model
        # returns its final hidden states and the loss projects them chunk by chunk
        self.project = self.state.tp > 1 or self.state.pp > 1
        self.cross_entropy = (cross_entropy_for(self.state) if self.project else
                              partial(linear_cross_entropy, weight=self.model.lm_head.weight))
        self.step = 0
        self.skipped_steps = self.skipped_in_a_row = 0  # divergence guard (`_guard`)
        latest = latest_checkpoint(self.run_dir / "checkpoints")
        if latest is not None:
            check_resumable(read_meta(latest)["config"], cfg, latest)
            self.step = load_checkpoint(latest, self.model, self.engine.optimizer, self.state)["step"]
        elif init_from is not None:  # a new run: the weights only; optimizer, step, data and RNG its own
            started = load_checkpoint(init_from, self.model, self.engine.optimizer, self.state, weights_only=True)
            if self.is_logger:
                print(f"megamoe: weights from {init_from} (step {started['step']} of that run); optimizer state, "
                      f"step count and data start fresh", flush=True)
        self.checkpoints = CheckpointWriter(self.run_dir / "checkpoints", env.rank, env.world_size,
                                            t.keep_checkpoints, self.step, t.async_save, t.collective_timeout_s)
        self.metrics = MetricsLogger(self.run_dir, t.steps, self.is_logger, cfg.run.tensorboard)
        self.profiler = StepProfiler(t.profile_steps, t.profile_ranks, env.rank, self.run_dir, self.device, self.step)
        if self.is_logger and self.profiler.missed:
            print(f"megamoe: train.profile_steps={t.profile_steps} starts at or before the resume point "
                  f"(step {self.step}); nothing is profiled: give later steps", flush=True)
        if self.is_logger:
            n = sum(p.numel() for p in self.model.parameters())
            print(f"megamoe: {self.state.describe()} | {n / 1e6:.2f}M params on rank 0 | "
                  f"{'resuming at step ' + str(self.step) if self.step else 'new run'} in {self.run_dir}",
                  flush=True)
            if self.step >= t.steps:
                print(f"megamoe: the run is finished (step {self.step} of train.steps={t.steps}): nothing to "
                      f"train; give train.steps above {self.step} to continue it", flush=True)

    # -------------------------------------------------------------------------------------
    def _micro_batch(self, data, step: int, micro: int) -> tuple[dict, torch.Tensor]:
        """One micro-batch of this rank: the model's inputs (`tokens`, and `documents` under
        `model.attention_mask=document`) and the labels, on the device."""
        t, s = self.cfg.train, self.state
        batch = partial(get_batch, data, step, t.global_batch_size, t.micro_batch_size, s.dp_rank, s.dp, micro)
        tokens = batch()
        inputs, labels = {"tokens": tokens[:, :-1]}, tokens[:, 1:]  # [mbs, seq]
        if data.has_loss_mask:  # fine-tuning data: only marked tokens are targets
            labels = labels.masked_fill(~batch(loss_mask=True)[:, 1:], -100)
        if self.cfg.model.attention_mask == "document":  # attention within each of the dataset's documents
            inputs["documents"] = batch(documents=True)[:, :-1]
        if self.device.type == "cuda":  # from pinned memory: a pageable copy waits for the GPU's queue
            def to_device(x):
                return x.contiguous().pin_memory().to(self.device, non_blocking=True)
        else:
            def to_device(x):
                return x.to(self.device)
        return {k: to_device(v) for k, v in inputs.items()}, to_device(labels)

    def _targets(self, data, step: int) -> float:
        """What each micro-batch's summed cross-entropy is divided by: the step's targets (labels
        != -100) over DP / (micro-batches × DP), so every target of the step weighs the same
        whatever the split into micro-batches and ranks (DeepSpeed then averages over both).
        Without loss masks every label is a target, and this is a micro-batch's mbs × seq."""
        t = self.cfg.train
        if not data.has_loss_mask:
            return float(t.micro_batch_size * self.cfg.data.seq_length)
        # Every DP rank's samples of the step (`get_batch`: samples step·gbs .. (step+1)·gbs) counted
        # here, the same number on every rank without a collective: on NCCL one would wait for the
        # work queued on the GPU, a host sync at every step.
        first = step * t.global_batch_size
        count = sum(int(data.loss_mask(i)[1:].sum()) for i in range(first, first + t.global_batch_size))
        return max(float(count), 1.0) / (self.gas * self.state.dp)

    def _lm_loss(self, logits: torch.Tensor, labels: torch.Tensor, targets: float) -> torch.Tensor:
        """A micro-batch's LM loss: its summed cross-entropy / the step's `targets` share."""
        return self.cross_entropy(logits, labels) / targets

    def train_step(self) -> dict:
        """One optimizer step, queued and read: returns its metrics (averaged over micro-batches
        and DP). `fit` reads most steps after queueing the next one instead (`train.overlap_read`)."""
        return self._finish_step(self._launch_step())

    def _launch_step(self, preempt: PreemptionHandler | None = None) -> "_Launched":
        """Queues one optimizer step (its micro-batches' forward and backward, the update) and the
        copy of its statistics to the host; nothing here waits for the device."""
        start = time.perf_counter()
        lr = lr_at(self.cfg, self.step)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        stats = StepStats(self.cfg, self.model, self.device)
        lm_loss = partial(self._lm_loss, targets=self._targets(self.train_data, self.step))
        cached = self.fp8_cache and cache_fp8_weights(self.model)  # the weights as this step's micro-batches see them
        if cached:
            self.profiler.mark("FP8 weights quantized")
        try:
            if self.state.pp > 1:  # 1F1B over the micro-batches
                pipeline_schedule.train_step(self.engine, self.state, self.cfg,
                                             partial(self._micro_batch, self.train_data, self.step), lm_loss, stats)
                self.profiler.mark("1F1B schedule (forward, backward, optimizer)")
            else:
                self._accumulate(lm_loss, stats)
        finally:
            if cached:  # the update is queued: evaluation and the next step must not see this step's forms
                release_fp8_weights(self.model)
        if self.cfg.train.gc_interval and (self.step + 1) % self.cfg.train.gc_interval == 0:
            gc.collect(1)  # the young objects, here where the step is queued and the host has time to spare
        # the preemption flag, agreed by every rank (MAX), travels with the statistics: no read of its own
        local = float(preempt is not None and preempt.received is not None)
        stop = comm.all_reduce(torch.full((1,), local, dtype=torch.float64, device=self.device),  # a fill:
                               op=dist.ReduceOp.MAX)  # torch.tensor([x], device=cuda) copies, waiting for the queue
        reduced = stats.reduced(self.state, self.gas, self.cfg.parallel.sequence_parallel)
        extra = [stop]
        opt = self.engine.optimizer
        if self.biases_on_device:  # aux-loss-free balancing, queued before the next step's routing
            routers = self._routers()
            update_expert_bias(routers, reduced[1], self.cfg.moe.bias_update_rate, taken=opt.pending_taken())
            bias = torch.zeros(reduced[1].shape, dtype=torch.float32, device=self.device)
            for row, router in routers.items():
                bias[row] = router.expert_bias
            if self.state.pp > 1:  # every stage's routers
                bias = comm.all_reduce(bias, self.state.pp_group)
            extra.append(bias)  # read with the statistics, for the metrics
        read = stats.start_read(self.state, self.gas, self.cfg.parallel.sequence_parallel, extra, reduced)
        self.step += 1
        return _Launched(self.step, lr, read, opt.steps_launched if getattr(opt, "defer_reads", False) else None,
                         start, time.perf_counter() - start)

    def _finish_step(self, launched: "_Launched") -> dict:
        """The launched step's read: its metrics, the optimizer's outcome (a skipped step counted by
        the divergence guard), the routers' bias update. Sets `stop_requested` when any rank was
        signalled to stop."""
        losses, load, (stop, *bias) = launched.read.result()
        self.stop_requested = self.stop_requested or bool(stop)
        opt = self.engine.optimizer
        if launched.optimizer_step is not None:  # our AdamW: its norm and skip flag on their way too
            norm, skipped = opt.outcome(launched.optimizer_step)
        else:
            skipped, norm = bool(getattr(opt, "overflow", False)), self.engine.get_global_grad_norm()
        if self.biases_on_device:  # updated at launch unless skipped; their values came with the read
            routing = self._after_optimizer_step(load, False, torch.tensor(bias, dtype=torch.float32).view(load.shape))
        else:
            routing = self._after_optimizer_step(load, update_bias=not skipped)
        self._guard(skipped, launched.step)
        return {**losses, "lr": launched.lr,
                "grad_norm": float(norm) if norm is not None else float("nan"),
                "skipped_steps": self.skipped_steps,
                "expert_load": ((load / load.sum(-1, keepdim=True).clamp_min(1)).tolist()
                                if self.cfg.moe_layer_ids() else []), **routing}

    def _overlaps(self, step: int) -> bool:
        """Whether step `step` is read after the next one is queued: with `train.overlap_read` and our
        AdamW settling its steps late, when nothing at this step needs its state first
        (evaluation, save, the end)."""
        t = self.cfg.train
        return (self.overlap and step < t.steps and step % t.eval_interval != 0
                and step % t.save_interval != 0 and not self.profiler.edge(step))

    def _routers(self) -> dict:
        """{row among all the model's MoE layers: its router} for this stage's routed MoE layers."""
        return {row: ffn.router for row, ffn in self.model.moe_rows().items() if hasattr(ffn, "router")}

    def _after_optimizer_step(self, load: torch.Tensor, update_bias: bool, bias: torch.Tensor | None = None) -> dict:
        """Aux-loss-free balancing: move the routers' expert biases by the step's loads [MoE layers, E],
        summed over every rank (so identical on every rank), unless the divergence guard skipped the
        step. Returns the step's load metrics (`bias`: the biases after the step, read already)."""
        moe, routers = self.cfg.moe, self._routers()
        if moe.bias_update_rate and update_bias:
            update_expert_bias(routers, load, moe.bias_update_rate)
        if not self.cfg.moe_layer_ids():
            return {}
        drops = moe.capacity_factor is not None and moe.routing == "token_choice" and moe.backend == "megamoe"
        routed = self.cfg.train.global_batch_size * self.cfg.data.seq_length * moe.top_k if drops else None
        if moe.bias_update_rate and bias is None:  # every stage's routers, for the logging rank
            bias = torch.zeros(load.shape, dtype=torch.float32)
            for row, router in routers.items():
                bias[row] = router.expert_bias.cpu()
            bias = comm.all_reduce(bias, self.state.pp_group) if self.state.pp > 1 else bias
        return step_load_metrics(load, routed, bias)

    def _guard(self, skipped: bool, step: int) -> None:
        """Divergence guard: the optimizer left a step whose gradient norm (or loss) was not
        finite undone; count it, and stop after `train.max_skipped_steps` in a row."""
        if not skipped:
            self.skipped_in_a_row = 0
            return
        self.skipped_steps += 1
        self.skipped_in_a_row += 1
        limit = self.cfg.train.max_skipped_steps
        if self.is_logger:
            print(f"megamoe: step {step} skipped: its gradient norm or loss is not finite; weights and "
                  f"optimizer state unchanged ({self.skipped_in_a_row} in a row, limit {limit})", flush=True)
        if self.skipped_in_a_row >= limit:
            raise DivergenceError(
                f"{self.skipped_in_a_row} steps in a row (to step {step}) had a non-finite gradient norm "
                f"or loss and were skipped (train.max_skipped_steps={limit}); the run has diverged. The last "
                "checkpoint holds finite weights: resume from it with a lower optim.lr, more "
                "optim.warmup_steps or a tighter optim.grad_clip")

    def _accumulate(self, lm_loss, stats: StepStats) -> None:
        """Forward and backward over the step's micro-batches (no pipeline), each forward's
        statistics added to `stats`."""
        for micro in range(self.gas):
            inputs, labels = self._micro_batch(self.train_data, self.step, micro)
            out = self.engine(**inputs, project=self.project)
            lm = lm_loss(out.logits, labels)
            stats.add(out.aux_loss, lm)
            self.profiler.mark("forward")  # a profiled step's phases (`StepProfiler.phases`); else nothing
            self.engine.backward(lm + out.aux_loss)
            self.profiler.mark("backward")
            if micro == self.gas - 1 and hasattr(self.engine.optimizer, "also_finite"):
                self.engine.optimizer.also_finite = stats.loss()  # a non-finite loss skips the step too
            self.engine.step()  # steps the optimizer after the last micro-batch only
            if micro == self.gas - 1:
                self.profiler.mark("optimizer")

    @torch.no_grad()
    def evaluate(self) -> dict:
        self.model.eval()
        total = torch.zeros(1, dtype=torch.float64, device=self.device)  # read once, at the end
        for i in range(self.cfg.train.eval_batches):  # each batch: the mean over its targets
            lm_loss = partial(self._lm_loss, targets=self._targets(self.valid_data, i))
            if self.state.pp > 1:
                total += pipeline_schedule.eval_lm_loss(self.engine, self.state, self.cfg,
                                                        partial(self._micro_batch, self.valid_data, i), lm_loss)
                continue
            for micro in range(self.gas):
                inputs, labels = self._micro_batch(self.valid_data, i, micro)
                total += lm_loss(self.engine(**inputs, project=self.project).logits, labels).double()
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
        # Python's automatic collector stops the host wherever an allocation crosses its threshold,
        # a full collection over the compiled graphs' objects for milliseconds (4.5 ms a step on the
        # small MoE of docs/performance.md, often while the accelerator waits); off in the loop, the
        # young objects are collected in the step (train_step) and everything beside saves and evals.
        manual_gc = t.gc_interval > 0
        if manual_gc:
            gc.collect()
            gc.disable()
        try:
            with PreemptionHandler() as preempt:
                queued = deque()  # launched steps not yet read: at most two
                read_at = time.perf_counter()  # when the last step was read
                while self.step < t.steps or queued:
                    if self.step < t.steps and not self.stop_requested and (
                            not queued or self._overlaps(queued[-1].step)):
                        with self.profiler.launching(self.step + 1):
                            queued.append(self._launch_step(preempt))
                        if len(queued) == 1 and self._overlaps(queued[0].step):
                            continue  # queue the next step before reading this one
                    launched = queued.popleft()
                    record = self._finish_step(launched)
                    # the time since the previous read (a GPU step's period), or where the work was done
                    # while queueing (on the CPU: a step read right after the one before it), the longer
                    now = time.perf_counter()
                    elapsed, read_at = max(now - max(launched.start, read_at), launched.queueing), now
                    profiled = self.profiler.read(launched.step)  # after the step's time is taken
                    if profiled is not None:
                        print(f"megamoe: rank {self.state.rank}: profile of steps {t.profile_steps[0]}-"
                              f"{t.profile_steps[1]} in {profiled} (open the .trace.json in https://ui.perfetto.dev)",
                              flush=True)
                    record = {"step": launched.step, **record, "tokens_per_sec": tokens_per_step / elapsed,
                              "step_time_ms": 1000 * elapsed, "tflops_per_rank": flops_per_rank / elapsed / 1e12}
                    if peak:
                        record["mfu"] = flops_per_rank / elapsed / peak
                    if not queued and (launched.step % t.eval_interval == 0 or launched.step == t.steps):
                        with record_function("megamoe eval"):  # named in a profile window that holds it
                            record.update(self.evaluate())
                    if (launched.step % t.log_interval == 0 or launched.step == t.steps or "eval_loss" in record
                            or self.stop_requested):
                        if self.device.type == "cuda":  # the allocator's peak so far in this process (no sync)
                            record["max_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
                        self.metrics.log(record)
                    if queued:  # the next step is on its way (a stop request drains it, below)
                        continue
                    saved = self.step % t.save_interval == 0 or self.step == t.steps
                    if saved:
                        with record_function("megamoe save"):
                            self.save()
                    if manual_gc and (saved or "eval_loss" in record):
                        gc.collect()  # a full collection costs little beside a save or an evaluation
                    if self.stop_requested:
                        if not saved:
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
            self.profiler.close()
            if manual_gc:
                gc.enable()
            self.metrics.close()  # also on preemption and errors: tensorboard flushes what it has


@dataclass
class _Launched:
    """A step queued on the device whose statistics are on their way to the host."""
    step: int  # its number: the step count once it is taken
    lr: float
    read: StatsRead
    optimizer_step: int | None  # our AdamW's `steps_launched` after it (None: DeepSpeed's optimizer)
    start: float  # host clock when its launch began
    queueing: float  # seconds its launch took


class DivergenceError(RuntimeError):
    """Too many consecutive steps had a non-finite gradient norm or loss."""


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
