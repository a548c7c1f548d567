"""Full-model training throughput: forward + backward tokens/s of megamoe's OLMoE against
transformers' OlmoeForCausalLM (grouped_mm experts, SDPA) holding the same weights, in one run.

    PYTHONUNBUFFERED=1 python bench/bench_model.py                  # OLMoE-1B-7B, seq 4096, bf16
    python bench/bench_model.py --cpu-smoke                         # tiny shapes on CPU, seconds

Each step is zero_grad + forward with labels (LM loss + router aux losses) + backward, on
random tokens; megamoe's LM loss is the trainer's (`--loss fused`: the chunked linear +
cross-entropy of `megamoe/train/loss.py`) unless `--loss logits`. Reported: median step time over --iters steps after --warmup steps (CUDA
events), tokens/s, MFU against a measured bf16 matmul ceiling, and peak allocated memory.
Each timed step is waited for, so the host's time from a step's start to its first kernel counts in
every step; `--back-to-back` queues the timed steps one after another with events around each and one
synchronisation after the last, as `../shared/peers`' benchmark times the peer stacks (added in
session 15 and not yet run on a GPU: docs/performance.md).
"""

import argparse
import gc
import json
import os
import sys
import time

import torch
import yaml

import gaps
from common import (build_hf_like, build_megamoe, env_info, matmul_ceiling_tflops,
                    out_dir, summary, sync, time_ms)
from megamoe.model.flops import flops_per_token
from megamoe.model.compile import apply_compile
from megamoe.config import Config, DataConfig, ModelConfig, MoEConfig
from megamoe.moe.experts import SwiGLUExperts, cache_fp8_weights, release_fp8_weights
from megamoe.moe.layer import MoELayer
from megamoe.train.loss import cross_entropy, linear_cross_entropy

FUSED_LOSS = True  # --loss


def tiny_config() -> Config:
    return Config(model=ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=64),
                  moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden=32), data=DataConfig(seq_length=64)).validate()


def gpu_config(settings: list[str], seq: int) -> Config:
    """OLMoE-1B-7B changed by `--set` items (SECTION.KEY=VALUE) at sequence length `seq`; dynamo
    set up for one static graph per micro-batch size."""
    cfg = Config.olmoe_1b_7b()
    for item in settings:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, yaml.safe_load(value))
    cfg.data.seq_length = cfg.model.max_seq_len = max(seq, cfg.model.max_seq_len)
    cfg.validate()
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.automatic_dynamic_shapes = False  # static graphs per micro-batch size
    return cfg


def open_log(device, cfg: Config, args, name: str):
    """(the bf16 matmul ceiling measured here, TFLOP/s; the JSONL log `name` under $OUT, opened for
    appending, its first row the environment and the arguments, also printed)."""
    info = env_info(device)
    ceiling = matmul_ceiling_tflops(device, n=8192 if device.type == "cuda" else 256)
    info.update(matmul_ceiling_tflops=ceiling, flops_per_token=flops_per_token(cfg, args.seq), args=vars(args))
    print(json.dumps(info), flush=True)
    log = open(os.path.join(out_dir(), name), "a")
    log.write(json.dumps({"env": info}) + "\n")
    return ceiling, log


def batches(cfg: Config, mb: int, seq: int, device, n: int = 4, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [torch.randint(0, cfg.model.vocab_size, (mb, seq + 1), generator=g).to(device) for _ in range(n)]


def megamoe_step(model, data, cuda_graphs: bool = False):
    it = iter(range(10**9))

    def step():
        t = data[next(it) % len(data)]
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        model.zero_grad(set_to_none=True)
        if FUSED_LOSS:  # what the trainer runs without TP and PP
            out = model(t[:, :-1], project=False)
            lm = linear_cross_entropy(out.logits, t[:, 1:], model.lm_head.weight)
        else:
            out = model(t[:, :-1])
            lm = cross_entropy(out.logits, t[:, 1:])
        (lm / t[:, 1:].numel() + out.aux_loss).backward()
    return step


def expert_loads(model) -> list[list[int]]:
    """Each MoE layer's rows per expert in the model's last forward (megamoe's layers; [] for
    others): the loads its expert GEMMs ran at, for `bench_grouped_gemm.py --loads`."""
    try:
        return [[int(c) for c in m.stats["expert_load"].tolist()] for m in model.modules()
                if isinstance(m, MoELayer) and "expert_load" in m.stats]
    except RuntimeError as e:  # e.g. a CUDA graph's output overwritten by a later replay: keep the timing
        print(f"expert loads not read: {str(e)[:200]}", flush=True)
        return []


def hf_step(model, data):
    it = iter(range(10**9))

    def step():
        t = data[next(it) % len(data)]
        model.zero_grad(set_to_none=True)
        model(input_ids=t[:, :-1], labels=t[:, :-1]).loss.backward()  # HF shifts labels itself
    return step


def measure(name, make_step, model, cfg, args, device, ceiling, log):
    rows = []
    for mb in args.mb:
        data = batches(cfg, mb, args.seq, device)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            times = time_ms(make_step(model, data), device, args.warmup, args.iters,
                            back_to_back=getattr(args, "back_to_back", False))
        except torch.OutOfMemoryError:
            print(f"{name} mb={mb}: out of memory", flush=True)
            model.zero_grad(set_to_none=True)
            continue
        s = summary(times)
        tokens = mb * args.seq
        tok_s = tokens / (s["median_ms"] * 1e-3)
        row = dict(system=name, mb=mb, seq=args.seq, tokens=tokens, **s, tok_s=tok_s,
                   tflops=tok_s * flops_per_token(cfg, args.seq) / 1e12,
                   mfu=tok_s * flops_per_token(cfg, args.seq) / 1e12 / ceiling,
                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
                   times_ms=[round(t, 3) for t in times])
        loads = expert_loads(model)
        if loads:  # the expert GEMMs' group sizes in the last timed step, by layer
            row["expert_loads"] = loads
        rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        print(f"{name:>22} mb={mb} median {s['median_ms']:8.2f} ms  {tok_s:9.0f} tok/s  "
              f"{row['tflops']:6.1f} TFLOP/s  MFU {row['mfu']:.3f}  peak {row['peak_gib'] or 0:.1f} GiB  "
              f"(min {s['min_ms']:.2f} max {s['max_ms']:.2f})", flush=True)
        if loads:
            ratios = [max(c) * len(c) / max(sum(c), 1) for c in loads]
            print(f"{'':>22} largest expert load / mean, by layer: {min(ratios):.2f}-{max(ratios):.2f}", flush=True)
        model.zero_grad(set_to_none=True)
    return rows


def logits_of(model, tokens, hf: bool):
    out = model(input_ids=tokens) if hf else model(tokens)
    return out.logits.detach().float()


def profile(model, cfg, args, device, path, make_step=megamoe_step):
    """Per-kernel device time of 2 steps of megamoe at the first micro-batch size."""
    from torch.profiler import ProfilerActivity, profile as torch_profile
    step = make_step(model, batches(cfg, args.mb[0], args.seq, device))
    for _ in range(2):
        step()
    sync(device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        for _ in range(2):
            step()
        sync(device)
    if device.type == "cuda":  # where the GPU waited for the host (bench/gaps.py)
        prof.export_chrome_trace("/tmp/trace.json")
        gaps.report("/tmp/trace.json", path.replace("profile_", "gaps_"))
    from torch.autograd import DeviceType
    events = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA and e.self_device_time_total > 0]
    events.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in events)
    lines = [f"kernel time per step {total / 2e3:.2f} ms (sum over kernels, mb={args.mb[0]})"]
    for e in events[:40]:
        lines.append(f"{e.self_device_time_total / 2e3:8.3f} ms {100 * e.self_device_time_total / total:5.1f}%"
                     f" {e.count // 2:5d}x  {e.key[:110]}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:26]), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--mb", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--back-to-back", action="store_true",
                    help="queue the timed steps without waiting for each (as ../shared/peers times its steps)")
    ap.add_argument("--systems", default="megamoe,megamoe-compile,megamoe-compile-cudagraphs,hf-grouped_mm",
                    help="comma list of megamoe, megamoe-compile, megamoe-compile-fp8 (moe.expert_precision=fp8), "
                         "megamoe-compile-fp8-cached (fp8, the weights quantized once before the timed steps, as "
                         "the trainer does once a step for its micro-batches), "
                         "megamoe-compile-cudagraphs, megamoe-compile-fp8-cached-cudagraphs, "
                         "megamoe-compile-model (one graph), hf-grouped_mm, hf-eager")
    ap.add_argument("--profile", action="store_true", help="kernel-time tables of the megamoe variants")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU in fp32: checks the script runs")
    ap.add_argument("--loss", choices=("fused", "logits"), default="fused",
                    help="megamoe's LM loss: the trainer's chunked linear + cross-entropy (fused) or the "
                         "full logits then cross-entropy")
    ap.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                    help="torch._inductor.config entries for this run (e.g. max_pointwise_cat_inputs=1)")
    ap.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE",
                    help="change the OLMoE-1B-7B model, e.g. model.d_model=512 moe.num_experts=0")
    args = ap.parse_args()
    global FUSED_LOSS
    FUSED_LOSS = args.loss == "fused"

    if args.cpu_smoke:
        device, dtype, cfg = torch.device("cpu"), torch.float32, tiny_config()
        args.seq, args.mb, args.warmup, args.iters = 32, [1, 2], 1, 2
    else:
        device, dtype, cfg = torch.device("cuda"), torch.bfloat16, gpu_config(args.set, args.seq)
    for item in args.inductor:
        key, value = item.split("=", 1)
        setattr(torch._inductor.config, key, yaml.safe_load(value))
    systems = args.systems.split(",")
    ceiling, log = open_log(device, cfg, args, "bench_model.jsonl")

    ours = build_megamoe(cfg, device, dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    print(f"megamoe params {n_params / 1e9:.3f} B", flush=True)
    check = batches(cfg, 1, args.seq, device, n=1, seed=99)[0][:, :-1]
    logits = {}
    results = []
    if "megamoe" in systems:
        results += measure("megamoe", megamoe_step, ours, cfg, args, device, ceiling, log)
        logits["megamoe"] = logits_of(ours, check, hf=False)
        if args.profile:
            profile(ours, cfg, args, device, os.path.join(out_dir(), "profile_megamoe.txt"))
    for name, mode in (("megamoe-compile", None), ("megamoe-compile-fp8", None), ("megamoe-compile-fp8-cached", None),
                       ("megamoe-compile-cudagraphs", "reduce-overhead"),
                       ("megamoe-compile-fp8-cached-cudagraphs", "reduce-overhead"), ("megamoe-compile-model", None)):
        if name not in systems or device.type != "cuda":
            continue
        for m in ours.modules():  # moe.expert_precision: fp8 for this variant only
            if isinstance(m, SwiGLUExperts):
                m.fp8 = "fp8" in name
        release_fp8_weights(ours)
        if "cached" in name:  # what one optimizer step's quantization of the weights costs
            times = []
            for _ in range(5):
                sync(device)
                t0 = time.perf_counter()
                cache_fp8_weights(ours)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            if mode:  # refilled in place: CUDA graphs read them where they are instead of copying them in
                for m in ours.modules():
                    if isinstance(m, SwiGLUExperts):
                        for t in (a for forms in m.fp8_cache for a in forms):
                            torch._dynamo.mark_static_address(t)
            print(f"{name}: the weights quantized in {sorted(times)[2]:.2f} ms (median of 5; first "
                  f"{times[0]:.0f} ms with compilation), once an optimizer step", flush=True)
        if name == "megamoe-compile-model":  # the whole model as one graph instead of each block
            torch._dynamo.reset()
            for m in ours.modules():
                m._compiled_call_impl = None
            ours.compile()
        else:
            apply_compile(ours, mode)
        make_step = (lambda m, d: megamoe_step(m, d, cuda_graphs=True)) if mode else megamoe_step
        t0 = time.perf_counter()
        try:
            make_step(ours, batches(cfg, args.mb[0], args.seq, device, n=1))()
            sync(device)
            print(f"{name}: first step (compilation) {time.perf_counter() - t0:.1f} s", flush=True)
            results += measure(name, make_step, ours, cfg, args, device, ceiling, log)
            if mode:
                torch.compiler.cudagraph_mark_step_begin()
            logits[name] = logits_of(ours, check, hf=False)
            if args.profile:
                profile(ours, cfg, args, device, os.path.join(out_dir(), f"profile_{name}.txt"), make_step)
        except Exception as e:  # report and go on to the reference rather than lose the run
            print(f"{name} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            ours.zero_grad(set_to_none=True)

    for impl in ("grouped_mm", "eager"):
        if f"hf-{impl}" not in systems:
            continue
        if not logits:
            logits["megamoe"] = logits_of(ours, check, hf=False)
        torch.compiler.reset()  # drops compiled graphs and their CUDA-graph memory pools
        gc.collect()
        hf = build_hf_like(ours, cfg, impl)
        del ours
        print(f"transformers experts implementation: {hf.config._experts_implementation}", flush=True)
        ref = logits_of(hf, check, hf=True)
        for name, lg in logits.items():
            rel = ((lg - ref).norm() / ref.norm()).item()
            print(f"logits rel. error {name} vs transformers: {rel:.2e}", flush=True)
            log.write(json.dumps({"check": name, "rel_err_vs_hf": rel}) + "\n")
        results += measure(f"hf-{impl}", hf_step, hf, cfg, args, device, ceiling, log)
        break  # one transformers model per run: both at once would not fit with the grads

    print("\nsystem                  mb   tok/s     MFU   peak GiB   median ms")
    for r in results:
        print(f"{r['system']:<22} {r['mb']:3d} {r['tok_s']:8.0f}  {r['mfu']:6.3f}  "
              f"{r['peak_gib'] or 0:8.1f}  {r['median_ms']:9.2f}")
    if not results:
        sys.exit("no system measured")


if __name__ == "__main__":
    main()
