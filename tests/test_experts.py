"""Stacked SwiGLU experts: the CPU loop and the CUDA grouped GEMM compute the same thing."""

import pytest
import torch
import torch.nn.functional as F

from megamoe.moe import experts
from megamoe.moe.experts import SwiGLUExperts
from megamoe.moe.layer import MoELayer


def experts_and_rows(device, dtype, num_experts=6, d=64, ffn=32, counts=(5, 0, 17, 1, 0, 9)):
    g = torch.Generator().manual_seed(0)
    ex = SwiGLUExperts(num_experts, d, ffn)
    with torch.no_grad():
        ex.w1.copy_(torch.randn(ex.w1.shape, generator=g) * 0.1)
        ex.w2.copy_(torch.randn(ex.w2.shape, generator=g) * 0.1)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), d, generator=g)
    return ex.to(device, dtype), x.to(device, dtype).requires_grad_(), counts.to(device)


def per_row(ex, x, counts):
    """Row i goes through expert e(i): the definition, one row at a time."""
    owner = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts)
    out = []
    for row, e in zip(x, owner.tolist()):
        gate, up = (row @ ex.w1[e]).chunk(2)
        out.append((F.silu(gate) * up) @ ex.w2[e])
    return torch.stack(out)


def test_cpu_loop_is_the_per_row_definition():
    ex, x, counts = experts_and_rows("cpu", torch.float64)
    torch.testing.assert_close(ex(x, counts, grouped=False), per_row(ex, x, counts))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch._grouped_mm runs on CUDA only; "
                    "CI has no GPU and covers the CPU loop above (run on the GPU machine: docs/performance.md)")
def test_grouped_mm_equals_the_loop_on_cuda():
    ex, x, counts = experts_and_rows("cuda", torch.bfloat16)
    grouped = ex(x, counts, grouped=True)
    g_grouped = torch.autograd.grad(grouped.float().square().sum(), (x, ex.w1, ex.w2))
    loop = ex(x, counts, grouped=False)
    g_loop = torch.autograd.grad(loop.float().square().sum(), (x, ex.w1, ex.w2))
    torch.testing.assert_close(grouped, loop, rtol=2e-2, atol=2e-3)
    for a, b in zip(g_grouped, g_loop):
        torch.testing.assert_close(a, b, rtol=3e-2, atol=3e-3)


ROUTINGS = {"token_choice": {}, "capacity": {"capacity_factor": 1.0}, "expert_choice": {"routing": "expert_choice"},
            "shared": {"num_shared_experts": 1}}


def grouped_layer(routing: str):
    """A bf16 MoE layer that takes the grouped-GEMM path (torch._grouped_mm also runs on CPU)."""
    torch.manual_seed(0)
    layer = MoELayer(16, 4, 2, 16, **ROUTINGS[routing])
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return layer.to(torch.bfloat16), torch.randn(2, 8, 16, dtype=torch.bfloat16)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_grouped_gemm_gets_int32_offsets_on_every_routing(monkeypatch, routing):
    seen = []

    def recording(x, w, offs):
        seen.append(offs.dtype)
        return real(x, w, offs=offs)

    real = torch._grouped_mm
    monkeypatch.setattr(experts, "grouped_mm_available", lambda x: True)
    monkeypatch.setattr(torch, "_grouped_mm", recording)
    layer, x = grouped_layer(routing)
    y, aux = layer(x)
    (y.float().square().sum() + aux).backward()
    assert seen == [torch.int32, torch.int32]


def test_compiled_expert_choice_runs_the_grouped_gemm(monkeypatch):
    """The H100 crash of issue 12 (`Offsets tensor must be integer (int32) tensor, but got
    torch.int64`), reproduced by inductor on CPU: expert choice's loads are a constant."""
    monkeypatch.setattr(experts, "grouped_mm_available", lambda x: True)
    layer, x = grouped_layer("expert_choice")
    eager = layer(x)[0]
    torch._dynamo.reset()
    compiled = torch.compile(layer)(x)[0]
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
