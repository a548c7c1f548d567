"""Shared pieces of the benchmarks: timing, the matmul ceiling, model builders (the FLOP model
is megamoe/model/flops.py, which the trainer uses too).

Timing follows one rule everywhere: warm-up steps first (compilation, allocator, cuBLAS
handles), then CUDA events around each repeated step, and the median of those.
"""

import os
import platform
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from megamoe.config import Config


def env_info(device: torch.device) -> dict:
    """Versions and the device name, printed at the top of every log."""
    import transformers
    info = {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(gpu=p.name, sms=p.multi_processor_count, gpu_mem_gib=round(p.total_memory / 2**30, 1),
                    cuda=torch.version.cuda)
        try:
            import triton
            info["triton"] = triton.__version__
        except ImportError:
            pass
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device: torch.device, warmup: int, iters: int, back_to_back: bool = False) -> list[float]:
    """Per-call milliseconds of fn() after `warmup` calls: CUDA events on GPU, host clock on CPU.
    back_to_back (GPU): the calls are queued one after another with a pair of events around each and
    one synchronisation after the last, as ../shared/peers' bench_peers.py times its steps, so the host
    queues a call while the GPU still runs the one before; otherwise each call is waited for, and the
    host's time to reach its first kernel counts in every call."""
    for _ in range(warmup):
        fn()
    sync(device)
    if back_to_back and device.type == "cuda":
        events = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize(device)
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "n": len(times)}


def matmul_ceiling_tflops(device: torch.device, n: int = 8192, iters: int = 20) -> float:
    """Measured bf16 dense matmul rate (n×n×n, random operands, median of `iters`)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = statistics.median(time_ms(lambda: a @ b, device, warmup=5, iters=iters))
    return 2 * n**3 / (ms * 1e-3) / 1e12


@contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def random_init_(model: nn.Module, std: float, seed: int) -> None:
    """Fast on-device init (normal(0, std); norms 1). The benchmarks need realistic routing,
    not megamoe.init_weights' layout-independent (CPU-generated) draws."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=gen)


def build_megamoe(cfg: Config, device: torch.device, dtype: torch.dtype, seed: int = 0):
    with torch.device(device), default_dtype(dtype):
        model = cfg.model.build(cfg.moe)
    random_init_(model, cfg.model.init_std, seed)
    return model


def build_hf_like(ours: nn.Module, cfg: Config, experts_impl: str):
    """transformers' OlmoeForCausalLM (SDPA attention, `experts_impl` experts, router aux loss
    on) holding the same weights as `ours`."""
    import transformers
    from megamoe.checkpoint.hf import hf_config_dict, to_hf
    p = next(ours.parameters())
    hf_cfg = transformers.OlmoeConfig(**hf_config_dict(cfg), output_router_logits=True)
    hf_cfg._attn_implementation = "sdpa"
    hf_cfg._experts_implementation = experts_impl
    with torch.device(p.device), default_dtype(p.dtype):
        hf = transformers.OlmoeForCausalLM(hf_cfg)
    state = {}
    for name, t in ours.named_parameters():
        state.update(to_hf(name, t.detach()))
    hf.load_state_dict(state, strict=True)
    return hf


def out_dir() -> str:
    """$OUT on the device machine, else ./bench_out."""
    d = os.environ.get("OUT", "bench_out")
    os.makedirs(d, exist_ok=True)
    return d
