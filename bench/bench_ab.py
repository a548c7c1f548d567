"""A/B of a module-level switch on the compiled forward+backward of OLMoE, in one process.

    PYTHONUNBUFFERED=1 python bench/bench_ab.py megamoe.moe.grouped_gemm.FUSE_SWIGLU=True,False
    python bench/bench_ab.py --cpu-smoke megamoe.moe.grouped_gemm.FUSE_SWIGLU=True,False
    python bench/bench_ab.py megamoe.a.X=True,False megamoe.b.Y=1,0     # several switches, set together

Builds the model once (`bench_model.py`'s OLMoE-1B-7B, seq 4096, bf16, or `--set` changes), then for
each of `--rounds` rounds and each value in turn sets the switch, recompiles the blocks and times
`bench_model.py`'s step (median of --iters after --warmup, CUDA events), so that the values alternate
on one GPU and one draw of weights and data. Rows go to `bench_ab.jsonl` under $OUT (or bench_out/),
with each MoE layer's expert loads of the last timed step. A profile of the first value's kernels
with `--profile` (`--profile-all`: of every value).
"""

import argparse
import importlib
import os
import sys
import time

import torch
import yaml

import bench_model as bm
from common import build_megamoe, out_dir, sync
from megamoe.moe.experts import cache_fp8_weights, release_fp8_weights
from megamoe.model.compile import apply_compile


def parse_switch(text: str):
    """'package.module.NAME=v1,v2' → (owner, NAME, [v1, v2]) with YAML values; the owner may be an
    attribute of a module (`torch._inductor.config.triton.enable_pdl=True,False`)."""
    target, values = text.split("=", 1)
    path, name = target.rsplit(".", 1)
    parts = path.split(".")
    for i in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            owner = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                owner = getattr(owner, attr)
        except AttributeError:
            break
        if hasattr(owner, name):
            return owner, name, [yaml.safe_load(v) for v in values.split(",")]
        break
    raise SystemExit(f"bench_ab: error: {path} has no {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("switch", nargs="+", help="MODULE.NAME=VALUE,VALUE,... (several: the i-th values set together)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mb", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--back-to-back", action="store_true", help="as bench_model.py's")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-all", action="store_true")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU in fp32, eager: checks the script runs")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE")
    ap.add_argument("--fp8-cache", action="store_true",
                    help="the FP8 experts' and projections' weights quantized once before each value's steps "
                         "(as megamoe-compile-fp8-cached)")
    args = ap.parse_args()
    switches = [parse_switch(text) for text in args.switch]
    if len({len(values) for _, _, values in switches}) != 1:
        sys.exit("bench_ab: error: give every switch the same number of values")
    names = "+".join(name for _, name, _ in switches)
    values = [tuple(v[i] for _, _, v in switches) for i in range(len(switches[0][2]))]
    if args.cpu_smoke:
        device, dtype, cfg = torch.device("cpu"), torch.float32, bm.tiny_config()
        args.seq, args.warmup, args.iters, args.rounds = 32, 1, 2, 1
    else:
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, bm.gpu_config(args.set, args.seq)
    args.mb = [args.mb]
    ceiling, log = bm.open_log(device, cfg, args, "bench_ab.jsonl")
    model = build_megamoe(cfg, device, dtype)
    results, cached = [], set()
    for rnd in range(args.rounds):
        for value in values:
            for (module, name, _), v in zip(switches, value):
                setattr(module, name, v)
            tag = ",".join(map(str, value))
            label = f"{names}={tag}"
            if args.fp8_cache:  # after the switches: they may make layers FP8 (`fp8_linear.Linear.fp8`)
                release_fp8_weights(model)
                cached |= {label} if cache_fp8_weights(model) else set()
            if device.type == "cuda":
                apply_compile(model, None)  # resets dynamo: the switch is read again while tracing
            t0 = time.perf_counter()
            bm.megamoe_step(model, bm.batches(cfg, args.mb[0], args.seq, device, n=1))()
            sync(device)
            print(f"{label}: first step {time.perf_counter() - t0:.1f} s"
                  f"{'; FP8 weights cached' if label in cached else ''}", flush=True)
            rows = bm.measure(f"{label} round {rnd}", bm.megamoe_step, model, cfg, args, device, ceiling, log)
            results += [(label, r) for r in rows]
            if rnd == 0 and (args.profile_all or args.profile and value == values[0]):
                bm.profile(model, cfg, args, device, os.path.join(out_dir(), f"profile_ab_{tag.replace(',', '_')}.txt"))
    print(f"\n{'value':<32} {'round':>5} {'tok/s':>9} {'median ms':>10}")
    for label, r in results:
        print(f"{label:<32} {r['system'].rsplit(' ', 1)[-1]:>5} {r['tok_s']:9.0f} {r['median_ms']:10.2f}")
    for value in values:
        label = f"{names}={','.join(map(str, value))}"
        ms = sorted(r["median_ms"] for lab, r in results if lab == label)
        if ms:
            print(f"{label}: medians {', '.join(f'{m:.2f}' for m in ms)} ms")
    if not results:
        sys.exit("no measurement")
    if args.fp8_cache and not cached:
        sys.exit("bench_ab: error: --fp8-cache found no FP8 experts or projections to cache "
                 "(--set moe.expert_precision=fp8 or model.attention_precision=fp8, or a switch that makes them)")


if __name__ == "__main__":
    main()
