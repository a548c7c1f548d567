"""FP8 expert GEMMs on the GPU against the same function computed dequantized (the CPU path), per
output, for group sizes that are and are not multiples of 16.   python3 bench/fp8_check.py"""

import json

import torch

from megamoe.moe import fp8
from megamoe.moe.experts import group_offsets


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def check(counts, k=256, m=128, seed=0):
    g = torch.Generator("cuda").manual_seed(seed)
    counts = torch.tensor(counts, device="cuda")
    x = torch.randn(int(counts.sum()), k, device="cuda", generator=g).bfloat16()
    w = (torch.randn(len(counts), k, m, device="cuda", generator=g) * 0.05).bfloat16()
    grad = torch.randn(x.shape[0], m, device="cuda", generator=g).bfloat16()
    outs = []
    for offs in (group_offsets(counts), None):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        y = fp8.grouped_mm(xs, ws, counts, offs)
        y.backward(grad)
        outs.append((y, xs.grad, ws.grad))
    plain = torch._grouped_mm(x, w, offs=group_offsets(counts))
    return {"counts": counts.tolist(), "out": rel(outs[0][0], outs[1][0]), "grad_x": rel(outs[0][1], outs[1][1]),
            "grad_w": rel(outs[0][2], outs[1][2]), "fp8_vs_bf16_out": rel(outs[1][0], plain)}


for counts in ([64, 32, 128, 16], [50, 0, 170, 16, 0, 90], [64, 0, 128, 32], [5, 17, 3, 101]):
    print(json.dumps(check(counts)), flush=True)
