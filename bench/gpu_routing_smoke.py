"""Every routing and balancing option trains a few steps, eager and compiled, on one GPU.

Re-run whenever the MoE layer changes (issue 12: compiled expert choice once crashed in the
grouped GEMM). Each case builds the model the trainer builds (`build_model`, so
`train.compile` compiles per block), in bf16 on CUDA, and takes a few AdamW steps on random
tokens, with the aux-loss-free bias update after each step where it is on. It prints one table
row per case and exits 1 if any case fails (an exception, or a non-finite loss).

    python bench/gpu_routing_smoke.py                 # on the GPU machine: eager and compiled
    python bench/gpu_routing_smoke.py --tiny          # CPU (CI): eager only, a tiny model
"""

import argparse
import math
import sys
import time
import traceback

import torch

from megamoe.config import load_config
from megamoe.moe.router import update_expert_bias
from megamoe.parallel.state import ParallelState
from megamoe.train.engine import build_model
from megamoe.train.loss import cross_entropy

CASES = {
    "token_choice": [],
    "capacity_1.25": ["moe.capacity_factor=1.25"],
    "expert_choice": ["moe.routing=expert_choice"],
    "shared_expert": ["moe.num_shared_experts=1"],
    "norm_topk_prob": ["moe.norm_topk_prob=true"],
    "lb_sequence": ["moe.lb_loss_scope=sequence"],
    "lb_global_batch": ["moe.lb_loss_scope=global_batch"],  # one rank: its own micro-batch
    "aux_free_bias": ["moe.bias_update_rate=0.001"],
    "aux_free_capacity": ["moe.bias_update_rate=0.001", "moe.capacity_factor=1.0", "moe.lb_loss_weight=0"],
    "router_fp32": ["moe.router_dtype=fp32"],
    "dense_first_layer": ["moe.dense_layers=[0]"],
    "deepspeed_backend": ["moe.backend=deepspeed"],
}
GPU_MODEL = ["model.vocab_size=50304", "model.d_model=1024", "model.n_layers=4", "model.n_heads=8",
             "model.max_seq_len=1024", "moe.num_experts=64", "moe.top_k=8", "moe.ffn_hidden=512",
             "data.seq_length=1024", "train.micro_batch_size=4"]
TINY_MODEL = ["model.vocab_size=256", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
              "model.max_seq_len=32", "moe.num_experts=8", "moe.top_k=2", "moe.ffn_hidden=32",
              "data.seq_length=16", "train.micro_batch_size=2", "train.device=cpu", "train.precision=fp32"]


def run_case(overrides: list[str], steps: int) -> float:
    """Train `steps` steps of the model these overrides describe; returns the last loss."""
    cfg = load_config(None, overrides).validate(1)
    model = build_model(cfg, ParallelState(1, 0))
    device = torch.device("cuda" if cfg.train.device != "cpu" and torch.cuda.is_available() else "cpu")
    model.to(device)
    if device.type == "cuda":
        for p in model.parameters():  # bf16 as the trainer's engine; buffers (expert biases) stay fp32
            p.data = p.data.bfloat16()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    shape = (cfg.train.micro_batch_size, cfg.data.seq_length + 1)
    loss = float("nan")
    for _ in range(steps):
        batch = torch.randint(0, cfg.model.vocab_size, shape, generator=g).to(device)
        out = model(batch[:, :-1])
        loss = cross_entropy(out.logits, batch[:, 1:]) / batch[:, 1:].numel() + out.aux_loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        rows = model.moe_rows()
        if cfg.moe.bias_update_rate:
            load = torch.stack([rows[r].stats["expert_load"].double().cpu() for r in sorted(rows)])
            update_expert_bias({r: f.router for r, f in rows.items()}, load, cfg.moe.bias_update_rate)
        loss = loss.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss}")
    return loss


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny fp32 model on the CPU, eager only")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--cases", nargs="*", choices=list(CASES), help="default: all")
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.tiny
    if not gpu and not args.tiny:
        print("megamoe: error: no GPU visible; run on the GPU machine, or pass --tiny for the CPU path",
              file=sys.stderr)
        return 2
    modes = ["eager", "compiled"] if gpu else ["eager"]
    base = GPU_MODEL if gpu else TINY_MODEL
    print(f"{'case':<20} {'mode':<9} {'status':<7} {'loss':>8} {'seconds':>8}  "
          f"({torch.cuda.get_device_name() if gpu else 'CPU'}, torch {torch.__version__})", flush=True)
    failures = 0
    for name in args.cases or CASES:
        for mode in modes:
            start = time.perf_counter()
            try:
                torch._dynamo.reset()
                loss = run_case([*base, *CASES[name], f"train.compile={mode == 'compiled'}"], args.steps)
                status, shown = "ok", f"{loss:8.4f}"
            except Exception:  # noqa: BLE001 - every case runs; the table shows which failed
                failures += 1
                status, shown = "FAILED", "-"
                traceback.print_exc()
            print(f"{name:<20} {mode:<9} {status:<7} {shown:>8} {time.perf_counter() - start:8.1f}", flush=True)
    print(f"{failures} of {len(args.cases or CASES) * len(modes)} cases failed" if failures else "all cases passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
