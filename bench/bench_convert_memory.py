"""Peak memory of the checkpoint conversions on the full OLMoE-1B-7B (6.92B parameters).

issue 5 asks that converting OLMoE-1B-7B never needs more than about 1.5x the model's size
in RAM. This benchmark writes a synthetic (random) OLMoE-1B-7B megamoe checkpoint in bf16,
then runs each conversion the way a user does (`megamoe-convert ...` in its own
process) and samples that process's memory from /proc every 50 ms:

  - RssAnon: memory the process allocated itself (tensors, buffers); it must fit in RAM.
  - VmRSS:   RssAnon plus resident file pages (safetensors files are memory-mapped); the
             file pages are page cache the kernel can drop, not memory the process needs.

    python bench/bench_convert_memory.py --workdir /big/disk   [--layers 16]

Needs about 3x the model's size on disk (13.8 GB each for source, transformers export and
re-import in bf16); each directory is removed as soon as the next step has read it.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent

from megamoe.checkpoint.canonical import expected_shapes, write_run
from megamoe.config import load_config

TOOL = [sys.executable, "-m", "megamoe.cli.convert"]


def olmoe_config(layers: int):
    # data.paths/tokenizer point nowhere: a synthetic checkpoint has no tokenizer to export.
    return load_config("olmoe-1b-7b",
                       [f"model.n_layers={layers}", "parallel.expert=1", "data.paths=[none]",
                        "data.tokenizer=none.json"])


def synthetic_tensors(cfg, generator: torch.Generator):
    """(name, bf16 tensor) for every parameter, one at a time: normal(0, 0.02), norms 1."""
    for name, shape in expected_shapes(cfg).items():
        if "norm" in name:
            yield name, torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=generator)
            yield name, t.to(torch.bfloat16)


def _status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def measure(cmd: list[str]) -> dict:
    """Run cmd; its peak RssAnon / VmRSS (bytes) sampled every 50 ms, and its wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            for key, value in _status(proc.pid).items():
                peak[key] = max(peak[key], value)
        except (FileNotFoundError, ProcessLookupError):
            break
        time.sleep(0.05)
    proc.wait()
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{''.join(lines)[-3000:]}")
    return {**peak, "seconds": round(time.perf_counter() - start, 1)}


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="a directory on a disk with room")
    parser.add_argument("--layers", type=int, default=16, help="16 is OLMoE-1B-7B; fewer for a quick try")
    args = parser.parse_args()
    work = args.workdir / "megamoe-convert-bench"
    if work.exists():
        raise SystemExit(f"{work} exists: remove it or pick another --workdir")
    work.mkdir(parents=True)
    try:
        cfg = olmoe_config(args.layers)
        n_params = sum(torch.Size(s).numel() for s in expected_shapes(cfg).values())
        model_bytes = 2 * n_params  # bf16
        t0 = time.perf_counter()
        write_run(work / "src", cfg, synthetic_tensors(cfg, torch.Generator().manual_seed(0)))
        print(f"synthetic OLMoE ({args.layers} layers): {n_params / 1e9:.2f}B parameters, "
              f"{model_bytes / 1e9:.1f} GB in bf16, written in {time.perf_counter() - t0:.0f} s", flush=True)
        steps = [
            ("to-hf (per-expert)", [*TOOL, "to-hf", "--no-progress", str(work / "src"), str(work / "hf")],
             work / "src"),
            ("from-hf", [*TOOL, "from-hf", "--no-progress", str(work / "hf"), str(work / "back"),
                         "data.paths=[none]", "data.tokenizer=none.json"], work / "hf"),
        ]
        results = {"parameters": n_params, "model_bytes_bf16": model_bytes, "ram_bytes":
                   os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "steps": {}}
        for label, cmd, done_with in steps:
            r = measure(cmd)
            r["anon_over_model"] = round(r["RssAnon"] / model_bytes, 3)
            r["rss_over_model"] = round(r["VmRSS"] / model_bytes, 3)
            results["steps"][label] = r
            print(f"{label:>20}: peak RssAnon {r['RssAnon'] / 1e9:5.2f} GB ({r['anon_over_model']:.2f}x model) | "
                  f"peak VmRSS {r['VmRSS'] / 1e9:5.2f} GB ({r['rss_over_model']:.2f}x) | {r['seconds']:.0f} s",
                  flush=True)
            shutil.rmtree(done_with)
        back = work / "back"
        print(f"re-imported checkpoint: {dir_bytes(back) / 1e9:.1f} GB on disk", flush=True)
        print(json.dumps(results))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
