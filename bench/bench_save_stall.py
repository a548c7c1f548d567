"""How long a checkpoint save stalls training: the time `Trainer.save` holds the training thread,
and the step times around it, with `train.async_save` on and off.

    python3 bench/bench_save_stall.py --async-save true -- key=value ...   (trainer overrides)

The first two saves of the run are timed (the first one allocates the pinned host buffers that
later ones reuse); the first checkpoint is deleted before the second is written and later saves
are skipped, so a 3.56 B-parameter run keeps one ~43 GB checkpoint on the disk. Prints one JSON
line; the run directory is removed at the end.
"""

import argparse
import json
import os
import shutil
import statistics
import time

import megamoe.train.loop as loop
from megamoe.train.rundir import RunLock
from megamoe.config import load_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--async-save", default="true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    cfg = load_config(None, [*args.overrides, f"train.async_save={args.async_save}"])
    real_save, saves, marks = loop.Trainer.save, [], []

    def save(self):
        if len(saves) == 2:
            return
        if saves:  # make room on the disk: the first checkpoint is only this benchmark's scratch
            self.checkpoints.wait()
            shutil.rmtree(self.run_dir / "checkpoints" / f"step_{marks[0]:08d}")
        t0 = time.perf_counter()
        real_save(self)
        saves.append(time.perf_counter() - t0)
        marks.append(self.step)

    loop.Trainer.save = save
    trainer = loop.Trainer(cfg, RunLock(cfg.run.dir))
    t0 = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - t0
    wall = time.perf_counter() - t0  # fit() returns once the last save is published
    records = [json.loads(line) for line in open(os.path.join(cfg.run.dir, "metrics.jsonl"))]
    after = [r["step_time_ms"] for r in records if r["step"] > marks[0]]
    before = [r["step_time_ms"] for r in records if 2 < r["step"] <= marks[0]]
    size = sum(f.stat().st_size for f in (trainer.run_dir / "checkpoints").rglob("*") if f.is_file())
    print(json.dumps({"async_save": args.async_save, "save_at_steps": marks, "save_call_s": [round(x, 2) for x in saves],
                      "checkpoint_gb": round(size / 1e9, 1), "fit_s": round(total, 1), "wall_s": round(wall, 1),
                      "step_ms_before": round(statistics.median(before), 1) if before else None,
                      "step_ms_after": [round(x, 1) for x in after]}), flush=True)
    shutil.rmtree(cfg.run.dir, ignore_errors=True)
    os._exit(0)


if __name__ == "__main__":
    main()
