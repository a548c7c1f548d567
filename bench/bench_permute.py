"""Dropless dispatch's token permutations alone: the row gather to the experts and the k-row sum
back, as `fused_permute`'s Triton kernels, torch's eager indexing and inductor's compiled torch form,
against a plain copy of the same bytes.

    python3 bench/bench_permute.py              # OLMoE-1B-7B (8,192 tokens) and the small model (32,768)
    python3 bench/bench_permute.py --sweep      # also other tiles of the Triton kernels

GB/s counts the bytes each must move once: the [N, d] rows written (gather) or read (sum) and the
[T, d] tokens read or written. Timed with triton.testing.do_bench (median).
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megamoe.moe import fused_permute  # noqa: E402

GEOMETRIES = {"olmoe": (8192, 2048, 8), "small": (32768, 512, 8)}  # tokens, d, k
SWEEP = [(4096, 1024, 4), (8192, 1024, 8), (4096, 512, 4), (8192, 512, 8), (2048, 256, 4), (4096, 256, 4), (8192, 256, 8),
         (4096, 128, 4)]


def bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    rows_out = []
    for geo, (t, d, k) in GEOMETRIES.items():
        src = torch.randn(t, d, device="cuda", dtype=torch.bfloat16)
        token_of_row = torch.randint(0, t, (t * k,), device="cuda")
        rows = torch.randn(t * k, d, device="cuda", dtype=torch.bfloat16)
        inverse = torch.randperm(t * k, device="cuda").view(t, k)
        nbytes = (t * k + t) * d * 2
        compiled_gather = torch.compile(lambda s, i: s[i])
        compiled_sum = torch.compile(lambda s, i: fused_permute.torch_sum_rows(s, i))
        cases = {
            "copy (same bytes)": lambda: torch.empty(t * k + t, d, device="cuda", dtype=torch.bfloat16).copy_(
                torch.empty(t * k + t, d, device="cuda", dtype=torch.bfloat16)),
            "gather triton": lambda: fused_permute.gather_rows(src, token_of_row),
            "gather torch eager": lambda: src[token_of_row],
            "gather inductor": lambda: compiled_gather(src, token_of_row),
            "sum triton": lambda: fused_permute.sum_rows(rows, inverse),
            "sum torch eager": lambda: rows[inverse].sum(1),
            "sum inductor": lambda: compiled_sum(rows, inverse),
        }
        for name, fn in cases.items():
            ms = bench(fn)
            if name == "copy (same bytes)":
                ms /= 2  # copy_ reads and writes every byte; the permutations move each once
            rows_out.append(dict(geometry=geo, case=name, ms=ms, gb_s=nbytes / ms / 1e6))
        if args.sweep:
            saved = dict(fused_permute.TILE)
            for elements, max_columns, warps in SWEEP:
                fused_permute.TILE.update(elements=elements, max_columns=max_columns, num_warps=warps)
                for name, fn in (("gather", lambda: fused_permute.launch_gather(src, token_of_row)),
                                 ("sum", lambda: fused_permute.launch_sum(rows, inverse))):
                    ms = bench(fn)
                    rows_out.append(dict(geometry=geo, case=f"{name} tile {elements}/{max_columns}/w{warps}",
                                         ms=ms, gb_s=nbytes / ms / 1e6))
            fused_permute.TILE.update(saved)
    with open(os.path.join(out_dir, "bench_permute.jsonl"), "a") as f:
        for r in rows_out:
            f.write(json.dumps(r) + "\n")
            print(f"{r['geometry']:>6}  {r['case']:<28} {r['ms'] * 1e3:8.1f} us  {r['gb_s']:7.0f} GB/s")


if __name__ == "__main__":
    main()
