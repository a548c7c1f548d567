"""One MoE layer alone, forward + backward, OLMoE shapes (d 2048, 64 experts × 1024, top-8),
8192 tokens: megamoe's MoELayer (eager and torch.compile'd) against the alternatives, all
holding the same weights and seeing the same input.

    PYTHONUNBUFFERED=1 python bench/bench_moe_layer.py
    python bench/bench_moe_layer.py --cpu-smoke

Variants: megamoe, megamoe-compile; `deepspeed` and `deepspeed-cap1.25` (`moe.backend:
deepspeed`, i.e. `deepspeed.moe.layer.MoE` with k=8, dropless / capacity factor 1.25; its top-k
gating renormalises the k weights, so its errors against megamoe are not rounding); `sort+index_add` (argsort, x[idx] gather, grouped GEMMs,
weighted index_add_ — the plain version megamoe started from); transformers' sparse MoE block
with grouped_mm and with eager experts; and `gemm-only`, the two grouped GEMMs with their
backward on balanced groups, the floor for any dispatch. TFLOP/s counts the router and
expert matmuls (6 · T · (d·E + k·3·d·F)).
"""

import argparse
import json
import os

import torch

from common import default_dtype, env_info, out_dir, summary, time_ms
from megamoe.moe.experts import grouped_mm_available
from megamoe.moe.layer import MoELayer


def sort_index_add(layer: MoELayer):
    """The plain dispatch: argsort by expert, gather rows, grouped GEMMs, weighted index_add_."""
    def forward(x):
        r = layer.router(x)
        order = torch.argsort(r.expert_idx, stable=True)
        tok = r.token_idx[order]
        out = layer.experts(x[tok], r.expert_load)
        out = out * r.weight[order].unsqueeze(-1)
        y = torch.zeros_like(x).index_add_(0, tok, out)
        return y, layer.lb_loss_weight * r.lb_loss + layer.z_loss_weight * r.z_loss
    return forward


def deepspeed_layer(layer: MoELayer, d: int, E: int, k: int, F_: int, capacity_factor: float | None):
    """`moe.backend: deepspeed` (megamoe.moe.deepspeed_backend) holding `layer`'s weights."""
    from megamoe.deepspeed_adapter import gate_weight, local_experts
    from megamoe.moe.deepspeed_backend import DeepSpeedMoE
    p = layer.experts.w1
    with torch.device(p.device), default_dtype(p.dtype):
        ds = DeepSpeedMoE(d, E, k, F_, capacity_factor, layer.lb_loss_weight)
    with torch.no_grad():
        gate_weight(ds.moe).copy_(layer.router.weight)
        for e, expert in enumerate(local_experts(ds.moe)):
            expert.w1.copy_(layer.experts.w1[e])
            expert.w2.copy_(layer.experts.w2[e])
    return ds


def hf_block(layer: MoELayer, d: int, E: int, k: int, F_: int, impl: str):
    import transformers
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock
    cfg = transformers.OlmoeConfig(hidden_size=d, intermediate_size=F_, num_experts=E, num_experts_per_tok=k,
                                   norm_topk_prob=False)
    cfg._experts_implementation = impl
    p = layer.experts.w1
    with torch.device(p.device), default_dtype(p.dtype):
        block = OlmoeSparseMoeBlock(cfg)
    with torch.no_grad():
        block.gate.weight.copy_(layer.router.weight)
        block.experts.gate_up_proj.copy_(layer.experts.w1.transpose(1, 2))
        block.experts.down_proj.copy_(layer.experts.w2.transpose(1, 2))

    def forward(x):
        return block(x.unsqueeze(0)).squeeze(0), None
    return forward, block


def gemm_only(layer: MoELayer, T: int, k: int):
    """The two grouped GEMMs (+ SwiGLU) on balanced groups: the floor under any dispatch."""
    E, d = layer.experts.num_experts, layer.experts.w1.shape[1]
    counts = torch.full((E,), T * k // E, device=layer.experts.w1.device)
    rows = torch.randn(T * k, d, device=counts.device, dtype=layer.experts.w1.dtype, requires_grad=True)

    def forward(x):
        return layer.experts(rows, counts), None
    return forward


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--variants", default="megamoe,megamoe-compile,deepspeed,deepspeed-cap1.25,sort+index_add,"
                                          "hf-grouped_mm,hf-eager,gemm-only")
    ap.add_argument("--cpu-smoke", action="store_true")
    args = ap.parse_args()
    if args.cpu_smoke:
        device, dtype = torch.device("cpu"), torch.float32
        T, d, E, k, F_ = 64, 32, 8, 2, 16
        args.warmup, args.iters = 1, 2
    else:
        device, dtype = torch.device("cuda"), torch.bfloat16
        T, d, E, k, F_ = args.tokens, 2048, 64, 8, 1024
        torch._dynamo.config.automatic_dynamic_shapes = False
    print(json.dumps(env_info(device)), flush=True)
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):
        layer = MoELayer(d, E, k, F_)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0, 0.02)
    x = torch.randn(T, d, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(T, d, device=device, dtype=dtype)
    dy_rows = torch.randn(T * k, d, device=device, dtype=dtype)  # gemm-only's output gradient
    flops = 6 * T * (d * E + k * 3 * d * F_)

    variants = {}
    for name in args.variants.split(","):
        if name == "megamoe":
            variants[name] = layer
        elif name == "megamoe-compile":
            if device.type == "cuda":
                variants[name] = torch.compile(layer)
        elif name == "sort+index_add":
            variants[name] = sort_index_add(layer)
        elif name.startswith("deepspeed"):
            variants[name] = deepspeed_layer(layer, d, E, k, F_, 1.25 if name.endswith("cap1.25") else None)
        elif name.startswith("hf-"):
            variants[name] = hf_block(layer, d, E, k, F_, name[3:])[0]
        elif name == "gemm-only":
            if grouped_mm_available(x):
                variants[name] = gemm_only(layer, T, k)

    def step(fn):
        def run():
            x.grad = None
            layer.zero_grad(set_to_none=True)
            y, aux = fn(x)
            tensors, grads = [y], [dy if y.shape == dy.shape else dy_rows]
            if aux is not None:
                tensors.append(aux)
                grads.append(torch.ones_like(aux))
            torch.autograd.backward(tensors, grads)
        return run

    ref_out = ref_grad = None
    rows = []
    for name, fn in variants.items():
        if name != "gemm-only":  # same function of the same weights: outputs and input grads agree
            try:
                step(fn)()
            except Exception as e:
                print(f"{name} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
                continue
            y = fn(x)[0].detach().float()
            g = x.grad.detach().float()
            if ref_out is None:
                ref_out, ref_grad = y, g
            err = ((y - ref_out).norm() / ref_out.norm()).item(), ((g - ref_grad).norm() / ref_grad.norm()).item()
        else:
            err = (float("nan"), float("nan"))
        try:
            s = summary(time_ms(step(fn), device, args.warmup, args.iters))
        except Exception as e:  # report and go on to the other variants
            print(f"{name} failed: {type(e).__name__}: {str(e)[:2000]}", flush=True)
            continue
        row = dict(variant=name, tokens=T, **s, tflops=flops / (s["median_ms"] * 1e-3) / 1e12,
                   rel_err_out=err[0], rel_err_grad_x=err[1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(os.path.join(out_dir(), "bench_moe_layer.jsonl"), "a") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    print(f"\nMoE layer fwd+bwd, {T} tokens (errors vs the first variant)")
    print("variant              median ms   TFLOP/s   rel.err out   rel.err dx")
    for r in rows:
        print(f"{r['variant']:<20} {r['median_ms']:9.2f} {r['tflops']:9.1f}   {r['rel_err_out']:11.2e}  "
              f"{r['rel_err_grad_x']:11.2e}")


if __name__ == "__main__":
    main()
