"""Per-block `torch.compile`, applied to a built model (torchtitan's `apply_compile`)."""

import torch
from torch import nn

# Inductor's kernels launched with programmatic dependent launch on Hopper and later: a kernel's
# prologue starts while the one before it drains (forward+backward of OLMoE, 16 layers, mb 2, H100:
# 135.02 / 135.43 ms against 136.19 / 136.37 without; docs/performance.md, session 15). False for A/B runs.
PDL = True


def compile_options(mode: str | None) -> dict | None:
    """The inductor options each block compiles with (None: inductor's defaults). A mode such as
    "reduce-overhead" is its own set of options, so PDL joins only the default mode."""
    if mode is None and PDL and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9:
        return {"triton.enable_pdl": True}
    return None


def apply_compile(model: nn.Module, mode: str | None = None) -> nn.Module:
    """torch.compile each decoder block in place: identical blocks share one compiled graph,
    and norms, RoPE, SwiGLU, the token permutations and residual adds get fused. Parameter
    names do not change (`Module.compile` compiles the call, not the module), so checkpoints
    are unaffected. mode "reduce-overhead" also replays each block's kernels as a CUDA graph."""
    torch._dynamo.reset()
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    options = compile_options(mode)
    for block in blocks:
        if options:
            block.compile(options=options)
        else:
            block.compile(mode=mode)
    return model
