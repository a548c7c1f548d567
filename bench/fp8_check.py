"""FP8 SwiGLU experts (`fp8.swiglu`: both products, SwiGLU between) on the GPU against the same function
computed dequantized one expert at a time (the CPU path), per output and gradient, for group sizes that are
and are not multiples of 16.   python3 bench/fp8_check.py"""

import json

import torch

from megamoe.moe import fp8
from megamoe.moe.experts import group_offsets


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def check(counts, d=256, f=256, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    counts = torch.tensor(counts, device="cuda")
    x = torch.randn(int(counts.sum()), d, device="cuda", generator=g).bfloat16()
    w1 = (torch.randn(len(counts), d, 2 * f, device="cuda", generator=g) * 0.05).bfloat16()
    w2 = (torch.randn(len(counts), f, d, device="cuda", generator=g) * 0.05).bfloat16()
    grad = torch.randn(x.shape[0], d, device="cuda", generator=g).bfloat16()
    outs = []
    for offs in (group_offsets(counts), None):
        xs, w1s, w2s = (t.clone().requires_grad_() for t in (x, w1, w2))
        y = fp8.swiglu(xs, w1s, w2s, counts, offs)
        y.backward(grad)
        outs.append((y, xs.grad, w1s.grad, w2s.grad))
    gate, up = torch._grouped_mm(x, w1, offs=group_offsets(counts)).chunk(2, -1)
    plain = torch._grouped_mm(torch.nn.functional.silu(gate) * up, w2, offs=group_offsets(counts))
    return {"counts": counts.tolist(), **{name: rel(a, b) for name, a, b in zip(("out", "grad_x", "grad_w1", "grad_w2"),
                                                                                 *outs)},
            "fp8_vs_bf16_out": rel(outs[1][0], plain)}


for counts in ([64, 32, 128, 16], [50, 0, 170, 16, 0, 90], [64, 0, 128, 32], [5, 17, 3, 101]):
    print(json.dumps(check(counts)), flush=True)
