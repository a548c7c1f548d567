"""The FP8 experts' quantizing passes alone (`megamoe/moe/fp8_fused.py`): each Triton kernel at its
default tiles and a sweep of (rows a program, warps), against inductor's code of its torch reference
and a plain copy of the same bytes, at one MoE layer of OLMoE-1B-7B (8,192 tokens, top-8, d 2048,
F 1024).

    python3 bench/bench_fp8_fused.py

GB/s counts the bytes each pass must move once (inputs read, outputs written; the combine's token
rows once per row, as they are gathered). Timed with triton.testing.do_bench (median); each sweep
row is checked against the default's outputs (the e4m3 bytes and scales equal).
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megamoe.moe import fp8_fused as K  # noqa: E402

TOKENS, D, F, TOP_K = 8192, 2048, 1024, 8
CONFIGS = [(1, 4), (1, 8), (2, 4), (2, 8), (2, 16), (4, 8), (4, 16)]  # (rows a program, warps)


def bench(fn):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def main():
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_fused.py: needs a CUDA GPU")
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "bench_fp8_fused.jsonl"), "a")
    n = TOKENS * TOP_K
    bf = dict(device="cuda", dtype=torch.bfloat16)
    h, g = 3 * torch.randn(n, 2 * F, **bf), torch.randn(n, F, **bf)
    grad, out = torch.randn(TOKENS, D, **bf), torch.randn(n, D, **bf)
    w_rows = torch.rand(n, device="cuda")
    token_of_row = torch.randint(0, TOKENS, (n,), device="cuda")
    passes = {  # name: (launch(config), reference, bytes moved once)
        "swiglu forward": (lambda c: K.launch_swiglu_quantized(h, config=c), lambda: K.swiglu_quantized_reference(h),
                           n * 2 * F * 2 + n * F + n * 4),
        "swiglu backward": (lambda c: K.launch_swiglu_backward(h, g, config=c),
                            lambda: K.swiglu_backward_reference(h, g),
                            n * 2 * F * 2 + n * F * 2 + n * 2 * F * 2 + n * 2 * F + n * 4 + n * F * 2),
        "combine backward": (lambda c: K.launch_combine_backward(grad, out, w_rows, token_of_row, config=c),
                             lambda: K.combine_backward_reference(grad, out, w_rows, token_of_row),
                             n * D * 2 * 2 + n * 4 + n * 8 + n * D * 2 + n * D + n * 4 + n * 4),
    }
    for name, (launch, reference, nbytes) in passes.items():
        compiled = torch.compile(reference)
        want = launch(None)
        row = {"pass": name, "bytes": nbytes, "default": bench(lambda: launch(None)), "inductor": bench(compiled),
               "copy": bench(lambda: torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").copy_(
                   torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")))}
        for c in CONFIGS:
            try:
                got = launch(c)
                same = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                       b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                           for a, b in zip(got[1:3], want[1:3]))
                row[str(c)] = (bench(lambda: launch(c)), same)
            except Exception as exc:  # a config that does not compile (registers, shared memory)
                row[str(c)] = (None, f"{type(exc).__name__}: {str(exc)[:120]}")
        log.write(json.dumps(row) + "\n")
        log.flush()
        gbs = lambda ms: nbytes / ms / 1e6  # noqa: E731
        print(f"{name:<17} default {row['default']:.3f} ms ({gbs(row['default']):5.0f} GB/s) | inductor "
              f"{row['inductor']:.3f} ms | copy of the bytes {row['copy']:.3f} ms ({gbs(row['copy']):5.0f} GB/s)",
              flush=True)
        print("    " + "  ".join(f"{c} {v[0]:.3f}{'' if v[1] is True else ' DIFFERS'}" if v[0] is not None
                                 else f"{c} x" for c, v in ((c, row[str(c)]) for c in CONFIGS)), flush=True)


if __name__ == "__main__":
    main()
