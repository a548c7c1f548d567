"""Rotary position embedding (RoPE, rotate-half convention as in OLMoE / Llama)."""

import functools

import torch


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None,
                 dtype=torch.float32, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, head_dim] for positions offset..offset+seq_len-1.

    Read-only and shared: a training step asks for the same tables every time, and making them
    was a dozen small kernels the GPU waited for at each step's start (docs/performance.md,
    session 13), so they are made once per (shape, device, dtype, offset). Not under inference
    mode, whose tensors autograd could not save later, nor while torch.compile traces."""
    device = torch.device(device if device is not None else "cpu")
    if torch.is_inference_mode_enabled() or torch.compiler.is_compiling():
        return _tables(seq_len, head_dim, theta, device, dtype, offset)
    return _cached_tables(seq_len, head_dim, float(theta), device, dtype, offset)


def _tables(seq_len, head_dim, theta, device, dtype, offset):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [S, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@functools.lru_cache(maxsize=8)
def _cached_tables(seq_len, head_dim, theta, device, dtype, offset):
    with torch.no_grad():
        return _tables(seq_len, head_dim, theta, device, dtype, offset)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
