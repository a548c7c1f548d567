"""Per-block `torch.compile`, applied to a built model (torchtitan's `apply_compile`)."""

import torch
from torch import nn


def apply_compile(model: nn.Module, mode: str | None = None) -> nn.Module:
    """torch.compile each decoder block in place: identical blocks share one compiled graph,
    and norms, RoPE, SwiGLU, the token permutations and residual adds get fused. Parameter
    names do not change (`Module.compile` compiles the call, not the module), so checkpoints
    are unaffected. mode "reduce-overhead" also replays each block's kernels as a CUDA graph."""
    torch._dynamo.reset()
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    for block in blocks:
        block.compile(mode=mode)
    return model
