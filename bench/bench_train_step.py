"""Where a full training step's time goes: `python -m megamoe.train`'s own Trainer, with the
engine's forward, backward and step timed (CUDA-synchronised) inside its `train_step`.

    python3 bench/bench_train_step.py [--steps 12] [--profile] -- key=value ...  (trainer overrides)

Checkpoint writing is switched off (the last step would write tens of GB). Prints one JSON line:
median ms per phase over the steps after the first 3, the step's median, and the peak memory;
with --profile also the top CUDA kernels of one step (torch.profiler) into $OUT/kernels_*.txt
and where the GPU idled waiting for the host into $OUT/gaps_*.txt (bench/gaps.py; the profiler's
own host overhead widens those gaps, so read them for where, not how much).
The synchronisation adds a little to each step: tokens/s are read from a run without it
(`tokens_per_sec` in metrics.jsonl, bench/train_device.sh).
"""

import argparse
import gc
import json
import os
import statistics
import time

import torch

import gaps
import megamoe.train.loop as loop
from megamoe.train.rundir import RunLock
from megamoe.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--name", default="run")
    ap.add_argument("--host", action="store_true",
                    help="no phase timing; report how long the host takes to enqueue a step (until "
                         "the step's one read) against the step: equal means the step is host-bound")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, [*args.overrides, f"train.steps={args.steps}"])
    loop.Trainer.save = lambda self: None
    trainer = loop.Trainer(cfg, RunLock(cfg.run.dir))
    engine = trainer.engine
    phases: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **k)
            torch.cuda.synchronize()
            phases[name].append(1e3 * (time.perf_counter() - t0))
            return out
        return wrapper

    enqueued, read_done, first_forward = [], [], []
    if args.host:
        read, forward = loop.StatsRead.result, engine.forward

        def read_marked(self, *a, **k):  # train_step reads each step right after queueing it
            enqueued.append(time.perf_counter())
            out = read(self, *a, **k)
            read_done.append(time.perf_counter())
            return out

        def forward_marked(*a, **k):
            if len(first_forward) < len(enqueued) + 1:
                first_forward.append(time.perf_counter())
            return forward(*a, **k)
        loop.StatsRead.result, engine.forward = read_marked, forward_marked
        phases = {}
        gc_ms, after = [0.0], [0.0]

        def gc_timer(phase, info, t=[0.0]):  # time in Python's garbage collector
            if phase == "start":
                t[0] = time.perf_counter()
            else:
                gc_ms[0] += 1e3 * (time.perf_counter() - t[0])
        gc.callbacks.append(gc_timer)
        after_step = loop.Trainer._after_optimizer_step

        def after_timed(self, *a, **k):
            t0 = time.perf_counter()
            out = after_step(self, *a, **k)
            after[0] += 1e3 * (time.perf_counter() - t0)
            return out
        loop.Trainer._after_optimizer_step = after_timed
    else:
        engine.forward = timed("forward", engine.forward)
        engine.backward = timed("backward", engine.backward)
        engine.step = timed("optimizer", engine.step)
    steps, starts, tail, skip = [], [], [], 3
    trainer.model.train()
    for i in range(args.steps):
        if args.profile and i == args.steps - 1:
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts, with_stack=True) as prof:
                t0 = time.perf_counter()
                trainer.train_step()
                torch.cuda.synchronize()
            out = os.environ.get("OUT", ".")
            with open(os.path.join(out, f"kernels_{args.name}.txt"), "w") as f:
                f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=70))
            trace = f"/tmp/trace_{args.name}.json"
            prof.export_chrome_trace(trace)
            gaps.report(trace, os.path.join(out, f"gaps_{args.name}.txt"))
        else:
            t0 = time.perf_counter()
            trainer.train_step()
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if args.host:
                tail.append(1e3 * (time.perf_counter() - t1))
                if i == skip - 1:
                    gc_ms[0] = after[0] = 0.0
        starts.append(t0)
        steps.append(1e3 * (time.perf_counter() - t0))
    skip = 3
    med = {k: statistics.median(v[skip:]) for k, v in phases.items()}
    step_ms = statistics.median(steps[skip:])
    tokens = cfg.train.global_batch_size * cfg.data.seq_length
    host = {}
    if args.host:
        ends = [s + t / 1e3 for s, t in zip(starts, steps)]
        host["enqueue_ms"] = round(statistics.median(1e3 * (e - s) for e, s in zip(enqueued[skip:], starts[skip:])), 1)
        # the GPU has nothing queued from a step's start to its first forward, and after its read
        host["before_forward_ms"] = round(statistics.median(1e3 * (f - s) for f, s in zip(first_forward[skip:], starts[skip:])), 2)
        n = args.steps - skip
        host.update(sync_after_step_ms=round(statistics.median(tail[skip:]), 2), gc_ms_per_step=round(gc_ms[0] / n, 2),
                    after_optimizer_step_ms=round(after[0] / n, 2))
        host["after_read_ms"] = round(statistics.median(1e3 * (e - r) for e, r in zip(ends[skip:], read_done[skip:])), 2)
    print(json.dumps({"name": args.name, **{f"{k}_ms": round(v, 1) for k, v in med.items()}, **host,
                      "rest_ms": round(step_ms - sum(med.values()), 1), "step_ms": round(step_ms, 1),
                      "tokens_per_sec_synced": round(tokens / step_ms * 1e3),
                      "params": sum(p.numel() for p in trainer.model.parameters()),
                      "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}), flush=True)
    os._exit(0)


if __name__ == "__main__":
    main()
