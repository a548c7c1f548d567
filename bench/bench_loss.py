"""The trainer's loss chunk on the GPU: cross-entropy and logits gradient of [n, V] bf16 logits.

    python3 bench/bench_loss.py                      # OLMoE's vocabulary, 8,192 and 10,672 rows
    python3 bench/bench_loss.py --sweep              # also the kernel's block and warp counts

Times the torch form (`loss._chunk_loss`) compiled by inductor, as the trainer ran it before
`fused_cross_entropy`, against the Triton kernel the trainer runs now; prints the bytes each would
move at one read of the logits and one write of their gradient (4 bytes an element), and the
kernel's agreement with the torch form. triton.testing.do_bench, median; records in
$OUT/bench_loss.jsonl.
"""

import argparse
import json
import os
import sys

import torch


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="8192,10672")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_loss.py: needs a CUDA GPU")
    import triton
    from megamoe.train import fused_cross_entropy as FC, loss as L
    out_dir = os.environ.get("OUT", "bench_out")
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "bench_loss.jsonl"), "a")
    compiled = torch.compile(L._chunk_loss, dynamic=False)
    for n in map(int, args.rows.split(",")):
        logits = (torch.randn(n, args.vocab, device="cuda") * 3).to(torch.bfloat16)
        labels = torch.randint(0, args.vocab, (n,), device="cuda")
        labels[::50] = -100
        ref_loss, ref_grad = compiled(logits, labels, True)
        bound_ms = 4 * n * args.vocab / 3.35e12 * 1e3  # H100 SXM HBM3 peak
        row = {"rows": n, "vocab": args.vocab, "bound_ms_at_3.35TBps": bound_ms,
               "torch_compiled_ms": triton.testing.do_bench(lambda: compiled(logits, labels, True), return_mode="median")}
        configs = [(FC.BLOCK, FC.NUM_WARPS)]
        if args.sweep:
            configs += [(b, w) for b in (1024, 2048, 4096, 8192) for w in (4, 8, 16) if (b, w) != configs[0]]
        for block, warps in configs:
            FC.BLOCK, FC.NUM_WARPS = block, warps
            loss, grad = FC.chunk_loss(logits, labels, True)
            err = ((grad.float() - ref_grad.float()).abs().max().item(), abs(loss.item() / ref_loss.item() - 1))
            ms = triton.testing.do_bench(lambda: FC.chunk_loss(logits, labels, True), return_mode="median")
            row[f"kernel_{block}x{warps}_ms"] = ms
            row[f"kernel_{block}x{warps}_err"] = err
        log.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
