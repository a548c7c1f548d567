"""Rotary position embedding (RoPE, rotate-half convention as in OLMoE / Llama)."""

import torch


def rope_cos_sin(seq_len: int, head_dim: int, theta: float, device=None,
                 dtype=torch.float32, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape [seq_len, head_dim] for positions offset..offset+seq_len-1."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                                / head_dim))
    pos = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq)  # [S, head_dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, head_dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, S, D]; cos/sin: [S, D]."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
