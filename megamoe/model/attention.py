"""Causal self-attention with OLMoE's QK-norm (over the whole q and k width) and RoPE."""

import torch
import torch.nn.functional as F
from torch import nn

from .norm import RMSNorm
from .rope import apply_rope

# q, k and v as one product against their weights concatenated (True), or three products (False, the default
# that every figure in docs/performance.md measured). One product reads x once, writes the input's gradient once
# instead of three partial gradients summed by the norm's backward, and runs one wider GEMM a direction; it
# costs a copy of the three weights a forward and a split of their gradient. The parameters stay q_proj,
# k_proj, v_proj (checkpoints, conversion and tensor parallelism's shards unchanged). Written for an A/B on the
# GPU (`bench/bench_ab.py megamoe.model.attention.FUSED_QKV=False,True`), not yet timed.
FUSED_QKV = False


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, eps: float = 1e-5,
                 clip_qkv: float | None = None):
        super().__init__()
        self.head_dim, self.clip_qkv = head_dim, clip_qkv
        width = n_heads * head_dim
        self.q_proj = nn.Linear(d_model, width, bias=False)
        self.k_proj = nn.Linear(d_model, width, bias=False)
        self.v_proj = nn.Linear(d_model, width, bias=False)
        self.o_proj = nn.Linear(width, d_model, bias=False)
        self.q_norm = RMSNorm(width, eps)
        self.k_norm = RMSNorm(width, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        if FUSED_QKV and self._fusable():
            weights = (self.q_proj.weight, self.k_proj.weight, self.v_proj.weight)
            q, k, v = F.linear(x, torch.cat(weights)).split([w.shape[0] for w in weights], dim=-1)
            q, k = self.q_norm(q), self.k_norm(k)
        else:
            q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        # [B, S, H*D] -> [B, H, S, D]; H is the local head count under tensor parallelism.
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, D]
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))

    def _fusable(self) -> bool:
        """q, k and v are plain products x Wᵀ: nn.Linear without bias, or modules that say so
        (`plain_product`: tensor parallelism's column shards whose input attention brought into the TP
        region once for the three)."""
        return all(getattr(p, "plain_product", type(p) is nn.Linear and p.bias is None)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
