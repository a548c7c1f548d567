"""The six expert GEMMs of one MoE layer's forward+backward, one by one, against a dense GEMM of
the same FLOPs: which weight layout and which kernel run them fastest.

    python3 bench/bench_grouped_gemm.py                 # OLMoE-1B-7B and the small model of target 4
    python3 bench/bench_grouped_gemm.py --triton        # also inductor's Triton grouped-GEMM template
    python3 bench/bench_grouped_gemm.py --ours          # bench/triton_grouped_gemm.py's kernels (an experiment), a config sweep
    python3 bench/bench_grouped_gemm.py --tma           # megamoe/moe/grouped_gemm.py's persistent TMA kernels, a config sweep
                                                        # (with their token rows read in place: the "+gather" rows)
    python3 bench/bench_grouped_gemm.py --tma --only "fwd w1,fwd w1 +gather"   # some products only
    python3 bench/bench_grouped_gemm.py --fp8           # the FP8 products: megamoe's kernel (a config sweep) against torch's
    python3 bench/bench_grouped_gemm.py --skew 1,4,8    # the weight gradients under imbalanced loads, long experts cut or not
    python3 bench/bench_grouped_gemm.py --loads bench_out/bench_model.jsonl   # the six at the loads bench_model.py's model routed

Rows are routed by a random top-k (near-balanced groups, as at initialisation). Layouts:
`in-out` stores w1 as [E, d, 2F] and w2 as [E, F, d] (megamoe's parameters); `out-in` stores
[E, 2F, d] and [E, d, F] (transformers' and torchtitan's) and passes the transpose. Each GEMM is
timed with triton.testing.do_bench (median), TFLOP/s over its 2·M·N·K.
"""

import argparse
import json
import os
import sys

import torch

GEOMETRIES = {  # tokens per step, d, F, E, k
    "olmoe": (8192, 2048, 1024, 64, 8),
    "small": (32768, 512, 256, 64, 8),
}


def bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def routed_counts(tokens, experts, k, device):
    choice = torch.rand(tokens, experts, device=device).topk(k, dim=1).indices.flatten()
    return torch.zeros(experts, dtype=torch.int64, device=device).scatter_add_(0, choice, torch.ones_like(choice))


def operands(tokens, d, f, e, k, device):
    """One layer's expert operands under a random top-k routing: rows x [N, d], activation h [N, F],
    output gradient dy [N, d], first projection's gradient dh [N, 2F], w1, w2, and the group ends."""
    n = tokens * k
    bf = dict(device=device, dtype=torch.bfloat16)
    offs = torch.cumsum(routed_counts(tokens, e, k, device), 0).to(torch.int32)
    x, h, dy, dh = (torch.randn(n, d, **bf), torch.randn(n, f, **bf), torch.randn(n, d, **bf),
                    torch.randn(n, 2 * f, **bf))
    w1, w2 = torch.randn(e, d, 2 * f, **bf) / d**0.5, torch.randn(e, f, d, **bf) / f**0.5
    return x, h, dy, dh, w1, w2, offs


def cases(tokens, d, f, e, k, device):
    """(name, flops, {layout: fn}) for the six GEMMs, and the dense GEMMs of the same FLOPs."""
    n = tokens * k
    bf = dict(device=device, dtype=torch.bfloat16)
    x, h, dy, dh, w1, w2, offs = operands(tokens, d, f, e, k, device)
    w1t, w2t = w1.transpose(-2, -1).contiguous(), w2.transpose(-2, -1).contiguous()
    gm = torch._grouped_mm
    out = [
        ("fwd w1  [N,d]x[d,2F]", 2 * n * d * 2 * f,
         {"in-out": lambda: gm(x, w1, offs=offs), "out-in": lambda: gm(x, w1t.transpose(-2, -1), offs=offs)}),
        ("fwd w2  [N,F]x[F,d]", 2 * n * f * d,
         {"in-out": lambda: gm(h, w2, offs=offs), "out-in": lambda: gm(h, w2t.transpose(-2, -1), offs=offs)}),
        ("dgrad w2 [N,d]x[d,F]", 2 * n * f * d,
         {"in-out": lambda: gm(dy, w2.transpose(-2, -1), offs=offs), "out-in": lambda: gm(dy, w2t, offs=offs)}),
        ("dgrad w1 [N,2F]x[2F,d]", 2 * n * d * 2 * f,
         {"in-out": lambda: gm(dh, w1.transpose(-2, -1), offs=offs), "out-in": lambda: gm(dh, w1t, offs=offs)}),
        ("wgrad w1 [d,N]x[N,2F]", 2 * n * d * 2 * f,
         {"in-out": lambda: gm(x.t(), dh, offs=offs), "out-in": lambda: gm(dh.t(), x, offs=offs)}),
        ("wgrad w2 [F,N]x[N,d]", 2 * n * f * d,
         {"in-out": lambda: gm(h.t(), dy, offs=offs), "out-in": lambda: gm(dy.t(), h, offs=offs)}),
    ]
    dense = [  # the dense twin's FFN GEMMs: the same FLOPs as one expert GEMM above, in one matrix
        ("dense fwd  [T,d]x[d,2kF]", 2 * tokens * d * 2 * k * f,
         lambda a=torch.randn(tokens, d, **bf), b=torch.randn(d, 2 * k * f, **bf): a @ b),
        ("dense fwd2 [T,kF]x[kF,d]", 2 * tokens * k * f * d,
         lambda a=torch.randn(tokens, k * f, **bf), b=torch.randn(k * f, d, **bf): a @ b),
        ("dense wgrad [d,T]x[T,2kF]", 2 * tokens * d * 2 * k * f,
         lambda a=torch.randn(tokens, d, **bf), b=torch.randn(tokens, 2 * k * f, **bf): a.t() @ b),
    ]
    return out, dense, (x, h, dy, dh, w1, w2, offs)


ONLY = None  # --only: the products to time, by name (all when None)


def sweep(geo, rows, configs, log, label):
    """Times torch._grouped_mm and each config of ours per GEMM (rows: name, flops, torch fn,
    ours(config) fn), checks ours against torch (relative error), logs a JSON row per GEMM and
    prints the best config that agrees (error < 1e-2) and the configs that failed or disagreed."""
    total_torch, total_best = 0.0, 0.0
    if ONLY is not None and ONLY - {r[0] for r in rows}:
        sys.exit(f"bench_grouped_gemm: error: --only names no product of this mode: "
                 f"{', '.join(sorted(ONLY - {r[0] for r in rows}))}; the products are: {', '.join(r[0] for r in rows)}")
    rows = [r for r in rows if ONLY is None or r[0] in ONLY]
    for name, flops, ref_fn, our_fn in rows:
        ref = ref_fn()
        row = {"geometry": geo, "gemm": name, "label": label, "torch": bench(ref_fn)}
        for c in configs:
            try:
                got = our_fn(c)
                err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                row[str(c)] = (bench(lambda: our_fn(c)), err)
            except Exception as exc:  # a config that does not fit (shared memory) or does not divide
                row[str(c)] = (None, f"{type(exc).__name__}: {str(exc)[:160]}")
        log.write(json.dumps(row) + "\n")
        log.flush()
        runs = [(key, v) for key, v in row.items() if isinstance(v, tuple)]
        timed = [(v[0], key, v[1]) for key, v in runs if v[0] is not None and v[1] < 1e-2]
        best = min(timed) if timed else (float("nan"), "-", float("nan"))
        total_torch += row["torch"]
        total_best += best[0]
        print(f"  {name:<18} torch {row['torch']:.3f} ms {flops / row['torch'] / 1e9:4.0f} TF/s | {label} best "
              f"{best[0]:.3f} ms {flops / best[0] / 1e9:4.0f} TF/s {best[1]} err {best[2]:.1e} | all "
              + " ".join(f"{v[0]:.3f}" if v[0] is not None else "x" for _, v in runs), flush=True)
        for key, v in runs:
            if v[0] is None or v[1] >= 1e-2:
                print(f"    {key}: {v[1]}", flush=True)
    print(f"  all: torch {total_torch:.3f} ms, {label} best per GEMM {total_best:.3f} ms", flush=True)


OUR_CONFIGS = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 4),
               (64, 256, 64, 4, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3), (128, 256, 128, 8, 2)]


def ours(geo, tokens, d, f, e, k, device, log, configs):
    """Our kernels per GEMM, each config; `+gather` reads the tokens through the row index instead
    of the permuted copy, against the gather kernel plus torch._grouped_mm."""
    import triton_grouped_gemm as gg  # beside this script
    from megamoe.moe import fused_permute
    n = tokens * k
    bf = dict(device=device, dtype=torch.bfloat16)
    counts = routed_counts(tokens, e, k, device)
    offs = torch.cumsum(counts, 0).to(torch.int32)
    index = torch.randint(0, tokens, (n,), device=device)
    xt, dyt = torch.randn(tokens, d, **bf), torch.randn(tokens, d, **bf)
    x, dy = xt[index], dyt[index]
    h, dh = torch.randn(n, f, **bf), torch.randn(n, 2 * f, **bf)
    w1, w2 = torch.randn(e, d, 2 * f, **bf) / d**0.5, torch.randn(e, f, d, **bf) / f**0.5
    gm = torch._grouped_mm
    gather = fused_permute.launch_gather
    rows = [  # name, flops, torch fn, ours(config) fn
        ("fwd w1", 2 * n * d * 2 * f, lambda: gm(x, w1, offs=offs), lambda c: gg.launch_rows_mm(x, w1, offs, config=c)),
        ("fwd w1 +gather", 2 * n * d * 2 * f, lambda: gm(gather(xt, index), w1, offs=offs),
         lambda c: gg.launch_rows_mm(xt, w1, offs, index, config=c)),
        ("fwd w2", 2 * n * f * d, lambda: gm(h, w2, offs=offs), lambda c: gg.launch_rows_mm(h, w2, offs, config=c)),
        ("dgrad w2", 2 * n * f * d, lambda: gm(dy, w2.transpose(-2, -1), offs=offs),
         lambda c: gg.launch_rows_mm(dy, w2.transpose(-2, -1), offs, config=c)),
        ("dgrad w2 +gather", 2 * n * f * d, lambda: gm(gather(dyt, index), w2.transpose(-2, -1), offs=offs),
         lambda c: gg.launch_rows_mm(dyt, w2.transpose(-2, -1), offs, index, config=c)),
        ("dgrad w1", 2 * n * d * 2 * f, lambda: gm(dh, w1.transpose(-2, -1), offs=offs),
         lambda c: gg.launch_rows_mm(dh, w1.transpose(-2, -1), offs, config=c)),
        ("wgrad w1", 2 * n * d * 2 * f, lambda: gm(x.t(), dh, offs=offs),
         lambda c: gg.launch_weight_grad_mm(x, dh, offs, config=c)),
        ("wgrad w1 +gather", 2 * n * d * 2 * f, lambda: gm(gather(xt, index).t(), dh, offs=offs),
         lambda c: gg.launch_weight_grad_mm(xt, dh, offs, index_a=index, config=c)),
        ("wgrad w2", 2 * n * f * d, lambda: gm(h.t(), dy, offs=offs),
         lambda c: gg.launch_weight_grad_mm(h, dy, offs, config=c)),
        ("wgrad w2 +gather", 2 * n * f * d, lambda: gm(h.t(), gather(dyt, index), offs=offs),
         lambda c: gg.launch_weight_grad_mm(h, dyt, offs, index_b=index, config=c)),
    ]
    sweep(geo, rows, configs, log, "ours")


# (BM, BN, BK, warps, stages, the gradient's output column slices, warp_specialize); 128×256×128 tiles in two
# stages ran 25-40% slower on every product (session 15's c4)
TMA_CONFIGS = [
    (128, 256, 64, 8, 3, 2, False), (128, 256, 64, 8, 4, 2, False), (128, 256, 64, 8, 3, 2, True),
    (128, 256, 64, 8, 4, 2, True), (128, 128, 64, 4, 4, 1, False), (128, 128, 128, 8, 3, 1, False),
    (256, 128, 64, 8, 3, 2, False), (64, 256, 64, 4, 4, 2, False),
    # five stages: the weight gradient's gathering forms (grouped_gemm.WGRAD_GATHER_STAGES; too much shared
    # memory for the row-grouped products' tiles)
    (128, 256, 64, 8, 5, 2, False), (256, 128, 64, 8, 5, 2, False),
]


def tma(geo, tokens, d, f, e, k, device, log, configs):
    """The persistent TMA kernels per GEMM and config, checked against torch._grouped_mm."""
    from megamoe.moe import grouped_gemm as G
    n = tokens * k
    x, h, dy, dh, w1, w2, offs = operands(tokens, d, f, e, k, device)
    w1t = w1.transpose(-2, -1).contiguous()
    gm = torch._grouped_mm
    rows = [
        ("fwd w1", 2 * n * d * 2 * f, lambda: gm(x, w1, offs=offs),
         lambda c: G.launch_rows_mm(x, w1, offs, config=c[:5], warp_specialize=c[6])),
        ("fwd w2", 2 * n * f * d, lambda: gm(h, w2, offs=offs),
         lambda c: G.launch_rows_mm(h, w2, offs, config=c[:5], warp_specialize=c[6])),
        ("dgrad w2", 2 * n * f * d, lambda: gm(dy, w2.transpose(-2, -1), offs=offs),
         lambda c: G.launch_rows_mm(dy, w2, offs, trans_b=True, config=c[:5], warp_specialize=c[6])),
        ("dgrad w1", 2 * n * d * 2 * f, lambda: gm(dh, w1.transpose(-2, -1), offs=offs),
         lambda c: G.launch_rows_mm(dh, w1, offs, trans_b=True, config=c[:5], warp_specialize=c[6])),
        # the same product with the weight stored transposed (B read as the forward reads it): whether the
        # input gradient's longer time at the forward's shapes comes from the transposed B tiles' loads
        ("dgrad w1, B stored [K, N]", 2 * n * d * 2 * f, lambda: gm(dh, w1t, offs=offs),
         lambda c: G.launch_rows_mm(dh, w1t, offs, config=c[:5], warp_specialize=c[6])),
        ("wgrad w1", 2 * n * d * 2 * f, lambda: gm(x.t(), dh, offs=offs),
         lambda c: G.launch_weight_grad_mm(x, dh, offs, config=c[:6], warp_specialize=c[6])),
        ("wgrad w2", 2 * n * f * d, lambda: gm(h.t(), dy, offs=offs),
         lambda c: G.launch_weight_grad_mm(h, dy, offs, config=c[:6], warp_specialize=c[6])),
        # the uncut weight gradient's loop over tiles with each tile's k-steps inside (grouped_gemm.WGRAD_FLAT
        # off; the rows above run the default, one flat loop over each program's k-steps, since session 16)
        ("wgrad w1 nested", 2 * n * d * 2 * f, lambda: gm(x.t(), dh, offs=offs),
         nested(lambda c: G.launch_weight_grad_mm(x, dh, offs, config=c[:6], warp_specialize=c[6]))),
        ("wgrad w2 nested", 2 * n * f * d, lambda: gm(h.t(), dy, offs=offs),
         nested(lambda c: G.launch_weight_grad_mm(h, dy, offs, config=c[:6], warp_specialize=c[6]))),
    ]
    # the products that read token rows in place through the row index (experts.READ_TOKENS_IN_PLACE,
    # READ_GRADIENT_IN_PLACE), against the gather kernel and torch._grouped_mm on its copy (each row counts the
    # gather; in the model one copy serves two products: x the forward and w1's gradient, dy w2's two gradients)
    from megamoe.moe import fused_permute
    index = torch.randint(0, tokens, (n,), device=device)
    xt, dyt = x[:tokens].contiguous(), dy[:tokens].contiguous()
    gather = fused_permute.launch_gather
    rows += [
        ("fwd w1 +gather", 2 * n * d * 2 * f, lambda: gm(gather(xt, index), w1, offs=offs),
         lambda c: G.launch_rows_mm(xt, w1, offs, config=c[:5], warp_specialize=c[6], a_index=index)),
        ("dgrad w2 +gather", 2 * n * f * d, lambda: gm(gather(dyt, index), w2.transpose(-2, -1), offs=offs),
         lambda c: G.launch_rows_mm(dyt, w2, offs, trans_b=True, config=c[:5], warp_specialize=c[6], a_index=index)),
        ("wgrad w1 +gather", 2 * n * d * 2 * f, lambda: gm(gather(xt, index).t(), dh, offs=offs),
         lambda c: G.launch_weight_grad_mm(xt, dh, offs, config=c[:6], warp_specialize=c[6], a_index=index)),
        ("wgrad w2 +gather", 2 * n * f * d, lambda: gm(h.t(), gather(dyt, index), offs=offs),
         lambda c: G.launch_weight_grad_mm(h, dyt, offs, config=c[:6], warp_specialize=c[6], b_index=index)),
    ]
    sweep(geo, rows, configs, log, "tma")


# (BM, BN, BK, warps, stages, warp_specialize) for the e4m3 products
FP8_CONFIGS = [
    (128, 256, 128, 8, 3, False), (128, 256, 128, 8, 4, False), (128, 256, 128, 8, 3, True),
    (128, 256, 64, 8, 4, False), (128, 256, 64, 8, 5, False), (128, 128, 128, 8, 4, False),
    (256, 128, 128, 8, 3, False), (128, 128, 128, 4, 5, False), (64, 256, 128, 4, 4, False),
]


def fp8(geo, tokens, d, f, e, k, device, log, configs):
    """The FP8 experts' four row-grouped products (e4m3, rowwise scales, as `moe.fp8` quantizes them):
    megamoe's kernel (`grouped_gemm.launch_scaled_rows_mm`) per config against `torch._scaled_grouped_mm`
    (CUTLASS, fast accumulation), and megamoe's bf16 kernel on the same shapes beside them."""
    from megamoe.moe import fp8 as F8, grouped_gemm as G
    n = tokens * k
    x, h, dy, dh, w1, w2, offs = operands(tokens, d, f, e, k, device)
    products = [  # name, rows [n, K], weight as the products take it: K-major [E, out, K]
        ("fwd w1", x, w1.transpose(1, 2).contiguous()), ("fwd w2", h, w2.transpose(1, 2).contiguous()),
        ("dgrad w2", dy, w2), ("dgrad w1", dh, w1)]
    rows = []
    for name, a, bt in products:
        aq, a_inv = F8.quantize(a, -1)
        bq, b_inv = F8.quantize(bt, -1)  # [E, M, K], [E, M, 1]
        flops = 2 * n * a.shape[1] * bt.shape[1]
        rows.append((name, flops,
                     lambda aq=aq, a_inv=a_inv, bq=bq, b_inv=b_inv: torch._scaled_grouped_mm(
                         aq, bq.transpose(1, 2), a_inv.squeeze(-1), b_inv.squeeze(-1), offs=offs,
                         out_dtype=torch.bfloat16, use_fast_accum=True),
                     lambda c, aq=aq, a_inv=a_inv, bq=bq, b_inv=b_inv: G.launch_scaled_rows_mm(
                         aq, a_inv, bq, b_inv, offs, config=c[:5], warp_specialize=c[5])))
        ms = bench(lambda a=a, bt=bt: G.rows_mm(a, bt, offs, trans_b=True))
        print(f"  {name:<18} megamoe bf16 {ms:.3f} ms {flops / ms / 1e9:4.0f} TF/s", flush=True)
    sweep(geo, rows, configs, log, "fp8")


def nested(launch):
    """`launch` with grouped_gemm.WGRAD_FLAT off for the call."""
    from megamoe.moe import grouped_gemm as G

    def run(config):
        saved, G.WGRAD_FLAT = G.WGRAD_FLAT, False
        try:
            return launch(config)
        finally:
            G.WGRAD_FLAT = saved
    return run


def skewed_counts(rows, experts, skew, cap, device):
    """Loads w_e ∝ (e + 1)^-α, α chosen so that the largest is `skew` × the mean (at most `cap` rows,
    a token's top-k experts being distinct), rolled so that the largest expert sits inside the list."""
    lo, hi = 0.0, 8.0
    for _ in range(60):
        alpha = (lo + hi) / 2
        w = torch.arange(1, experts + 1, dtype=torch.float64) ** -alpha
        lo, hi = (alpha, hi) if w[0] / w.mean() < skew else (lo, alpha)
    counts = torch.minimum((w / w.sum() * rows).floor().long(), torch.tensor(cap))
    counts[-1] += rows - counts.sum()
    return torch.roll(counts, experts // 3).to(device)


def skew(geo, tokens, d, f, e, k, device, log, skews):
    """Both weight gradients of a layer at loads whose largest is `skew` × the mean (1: random
    top-k): megamoe's kernel with long experts cut into pieces (`grouped_gemm.wgrad_cut`), the same
    kernel without cutting, and torch._grouped_mm; relative errors against torch."""
    from megamoe.moe import grouped_gemm as G
    n = tokens * k
    x, h, dy, dh, *_ = operands(tokens, d, f, e, k, device)
    for s in skews:
        counts = routed_counts(tokens, e, k, device) if s == 1 else skewed_counts(n, e, s, tokens, device)
        offs = torch.cumsum(counts, 0).to(torch.int32)
        load = (counts.max() / counts.float().mean()).item()
        for name, a, b in (("wgrad w1", x, dh), ("wgrad w2", h, dy)):
            per = (a.shape[1] // G.WGRAD_CONFIG[0]) * (b.shape[1] // G.WGRAD_CONFIG[1])
            cut = G.wgrad_cut(n, e, a.shape[1], b.shape[1], per, G.WGRAD_CONFIG[2],
                              torch.cuda.get_device_properties(device).multi_processor_count)
            ref = torch._grouped_mm(a.t(), b, offs=offs)
            row = {"geometry": geo, "gemm": name, "skew": s, "load_max_over_mean": load, "cut_at": cut,
                   "torch": bench(lambda: torch._grouped_mm(a.t(), b, offs=offs))}
            for key, p in (("cut", None), ("uncut", (0, 0))):
                got = G.launch_weight_grad_mm(a, b, offs, cut=p)
                row[key] = bench(lambda: G.launch_weight_grad_mm(a, b, offs, cut=p))
                row[key + "_err"] = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            log.write(json.dumps(row) + "\n")
            log.flush()
            print(f"  {name} load max/mean {load:4.1f} cut, piece {cut}: cut {row['cut']:.3f} ms "
                  f"(err {row['cut_err']:.1e}), uncut {row['uncut']:.3f} ms (err {row['uncut_err']:.1e}), "
                  f"torch {row['torch']:.3f} ms", flush=True)


def model_loads(path):
    """(system, micro-batch, [per-layer expert loads]) of the first record of bench_model.py that has them."""
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("expert_loads"):
                return r["system"], r["mb"], r["expert_loads"]
    sys.exit(f"bench_grouped_gemm.py: {path} holds no expert_loads (bench_model.py writes them with each "
             f"megamoe row); run bench_model.py first")


def at_model_loads(path, geo, d, f, e, device, log):
    """The six products of every MoE layer at the loads of bench_model.py's last timed step, ours (the
    kernels and configs the model runs: `grouped_gemm.rows_mm`, `weight_grad_mm`) and torch's, summed
    over the layers: the expert GEMMs' time a step, to set beside that run's kernel profile. Operands are
    random; only the group sizes come from the model."""
    from megamoe.moe import grouped_gemm as G
    system, mb, loads = model_loads(path)
    if len(loads[0]) != e:
        sys.exit(f"bench_grouped_gemm.py: {path} routed to {len(loads[0])} experts, geometry {geo} has {e}: "
                 f"name the model's geometry first in --geometries")
    n = sum(loads[0])
    x, h, dy, dh, w1, w2, _ = operands(n, d, f, e, 1, device)
    gm = torch._grouped_mm
    products = [  # name, flops, ours(offs), torch(offs)
        ("fwd w1", 2 * n * d * 2 * f, lambda o: G.rows_mm(x, w1, o), lambda o: gm(x, w1, offs=o)),
        ("fwd w2", 2 * n * f * d, lambda o: G.rows_mm(h, w2, o), lambda o: gm(h, w2, offs=o)),
        ("dgrad w2", 2 * n * f * d, lambda o: G.rows_mm(dy, w2, o, trans_b=True),
         lambda o: gm(dy, w2.transpose(-2, -1), offs=o)),
        ("dgrad w1", 2 * n * d * 2 * f, lambda o: G.rows_mm(dh, w1, o, trans_b=True),
         lambda o: gm(dh, w1.transpose(-2, -1), offs=o)),
        ("wgrad w1", 2 * n * d * 2 * f, lambda o: G.weight_grad_mm(x, dh, o), lambda o: gm(x.t(), dh, offs=o)),
        ("wgrad w2", 2 * n * f * d, lambda o: G.weight_grad_mm(h, dy, o), lambda o: gm(h.t(), dy, offs=o)),
    ]
    ratios = [max(c) * e / n for c in loads]
    print(f"{path}: {system} mb {mb}, {len(loads)} MoE layers of {n} rows, largest expert load / mean "
          f"{min(ratios):.2f}-{max(ratios):.2f}", flush=True)
    total = {"ours": 0.0, "torch": 0.0}
    for name, flops, our_fn, ref_fn in products:
        row = {"geometry": geo, "gemm": name, "loads_of": system, "mb": mb, "ours": 0.0, "torch": 0.0,
               "max_rel_err": 0.0}
        for counts in loads:
            offs = torch.cumsum(torch.tensor(counts, device=device), 0).to(torch.int32)
            got, ref = our_fn(offs).float(), ref_fn(offs).float()
            row["max_rel_err"] = max(row["max_rel_err"], ((got - ref).norm() / ref.norm()).item())
            row["ours"] += bench(lambda: our_fn(offs))
            row["torch"] += bench(lambda: ref_fn(offs))
        log.write(json.dumps(row) + "\n")
        log.flush()
        for key in total:
            total[key] += row[key]
        layers = len(loads)
        print(f"  {name:<9} ours {row['ours']:7.3f} ms ({flops * layers / row['ours'] / 1e9:4.0f} TF/s), torch "
              f"{row['torch']:7.3f} ms ({flops * layers / row['torch'] / 1e9:4.0f} TF/s), max rel. err "
              f"{row['max_rel_err']:.1e}", flush=True)
    print(f"  all {len(loads)} layers: ours {total['ours']:.3f} ms, torch {total['torch']:.3f} ms", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--geometries", default="olmoe,small")
    ap.add_argument("--triton", action="store_true", help="also time inductor's Triton template (autotuned)")
    ap.add_argument("--ours", action="store_true", help="time the Triton grouped GEMMs of bench/triton_grouped_gemm.py (config sweep)")
    ap.add_argument("--tma", action="store_true", help="time the persistent TMA kernels of megamoe/moe/grouped_gemm.py (config sweep)")
    ap.add_argument("--fp8", action="store_true", help="time megamoe's FP8 kernel (config sweep) against "
                    "torch._scaled_grouped_mm on the four FP8 products")
    ap.add_argument("--skew", default=None, help="comma-separated largest-load / mean ratios: time the weight "
                    "gradients with and without cutting long experts (1: random top-k routing)")
    ap.add_argument("--loads", default=None, metavar="BENCH_MODEL_JSONL",
                    help="time the six products of each layer at the expert loads bench_model.py recorded, "
                         "in the first geometry of --geometries (d, F, E)")
    ap.add_argument("--only", default=None, help="comma-separated product names of --ours / --tma to time, "
                    "e.g. 'fwd w1,fwd w1 +gather'")
    args = ap.parse_args()
    if args.only:
        global ONLY
        ONLY = set(args.only.split(","))
    if not torch.cuda.is_available():
        sys.exit("bench_grouped_gemm.py: needs a CUDA GPU (torch._grouped_mm times nothing on CPU)")
    device = torch.device("cuda")
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "bench_grouped_gemm.jsonl"), "a")
    if args.triton:
        import torch._inductor.config as ic
        from torch._inductor.kernel import mm_grouped
        ic.max_autotune_gemm_backends = "TRITON"
        # a focused search: the template's full space (144 configs) takes minutes per shape
        mm_grouped._NV_CONFIGS[:] = [c for c in mm_grouped._NV_CONFIGS
                                     if c.kwargs["BLOCK_M"] == 128 and c.kwargs["BLOCK_N"] in (128, 256)
                                     and c.kwargs["BLOCK_K"] in (64, 128)]
    if args.loads:
        geo = args.geometries.split(",")[0]
        _, d, f, e, _ = GEOMETRIES[geo]
        at_model_loads(args.loads, geo, d, f, e, device, log)
        return
    for geo in args.geometries.split(","):
        tokens, d, f, e, k = GEOMETRIES[geo]
        print(f"\n{geo}: tokens {tokens}, d {d}, F {f}, E {e}, top-{k}", flush=True)
        if args.ours:
            ours(geo, tokens, d, f, e, k, device, log, OUR_CONFIGS)
            continue
        if args.skew:
            skew(geo, tokens, d, f, e, k, device, log, [float(v) for v in args.skew.split(",")])
            continue
        if args.fp8:
            fp8(geo, tokens, d, f, e, k, device, log, FP8_CONFIGS)
            continue
        if args.tma:
            tma(geo, tokens, d, f, e, k, device, log, TMA_CONFIGS)
            continue
        gemms, dense, (x, h, dy, dh, w1, w2, offs) = cases(tokens, d, f, e, k, device)
        totals = {}
        for name, flops, fns in gemms:
            row = {"geometry": geo, "gemm": name}
            for layout, fn in fns.items():
                ms = bench(fn)
                row[layout] = ms
                totals[layout] = totals.get(layout, 0) + ms
            if args.triton:
                compiled = torch.compile(lambda a, b, o: torch._grouped_mm(a, b, offs=o),
                                         mode="max-autotune-no-cudagraphs", dynamic=False)
                operands = {"fwd w1": (x, w1), "fwd w2": (h, w2), "dgrad w2": (dy, w2.transpose(-2, -1)),
                            "dgrad w1": (dh, w1.transpose(-2, -1)), "wgrad w1": (x.t(), dh),
                            "wgrad w2": (h.t(), dy)}[name[:8].strip()]
                try:
                    ref = torch._grouped_mm(*operands, offs=offs).float()
                    got = compiled(*operands, offs).float()
                    row["triton_rel_err"] = ((got - ref).norm() / ref.norm()).item()
                    ms = bench(lambda: compiled(*operands, offs))
                    row["triton"] = ms
                    totals["triton"] = totals.get("triton", 0) + ms
                except Exception as err:  # report and go on
                    row["triton_error"] = f"{type(err).__name__}: {str(err)[:300]}"
                torch._dynamo.reset()
            row.update({f"{key}_tflops": flops / (row[key] * 1e-3) / 1e12 for key in ("in-out", "out-in", "triton")
                        if key in row})
            log.write(json.dumps(row) + "\n")
            print(f"  {name:<24} " + "  ".join(f"{key} {row[key]:.3f} ms {row[key + '_tflops']:5.0f} TF/s"
                                              for key in ("in-out", "out-in", "triton") if key in row)
                  + (f"  triton err {row['triton_rel_err']:.1e}" if "triton_rel_err" in row else "")
                  + (f"  {row['triton_error']}" if "triton_error" in row else ""), flush=True)
        for name, flops, fn in dense:
            ms = bench(fn)
            log.write(json.dumps({"geometry": geo, "gemm": name, "ms": ms}) + "\n")
            print(f"  {name:<24} cuBLAS {ms:.3f} ms {flops / (ms * 1e-3) / 1e12:5.0f} TF/s", flush=True)
        print("  six expert GEMMs: " + ", ".join(f"{key} {v:.2f} ms" for key, v in totals.items()), flush=True)
        log.write(json.dumps({"geometry": geo, "totals_ms": totals}) + "\n")


if __name__ == "__main__":
    main()
