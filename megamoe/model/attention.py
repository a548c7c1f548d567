"""Causal self-attention with OLMoE's QK-norm (over the whole q and k width) and RoPE."""

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from .fp8_linear import Linear
from .norm import RMSNorm
from .rope import apply_rope


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, head_dim: int, eps: float = 1e-5,
                 clip_qkv: float | None = None, fp8: bool = False):
        """fp8: q, k, v and o with their forward and input-gradient products in e4m3 (`fp8_linear`)."""
        super().__init__()
        self.head_dim, self.clip_qkv = head_dim, clip_qkv
        width = n_heads * head_dim
        self.q_proj = Linear(d_model, width, fp8)
        self.k_proj = Linear(d_model, width, fp8)
        self.v_proj = Linear(d_model, width, fp8)
        self.o_proj = Linear(width, d_model, fp8)
        self.q_norm = RMSNorm(width, eps)
        self.k_norm = RMSNorm(width, eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: None (causal), [B, 1, S, S] bool, True where a query may attend a key, or the same as a
        FlexAttention `BlockMask` (`document_mask`)."""
        B, S, _ = x.shape
        q, k, v = self.q_norm(self.q_proj(x)), self.k_norm(self.k_proj(x)), self.v_proj(x)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        # [B, S, H*D] -> [B, H, S, D]; H is the local head count under tensor parallelism.
        q, k, v = (t.view(B, S, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, S, D]
        elif isinstance(mask, BlockMask):
            out = _flex(q.is_cuda)(q, k, v, block_mask=mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


# model.attention_mask=document on a GPU: FlexAttention's kernel, which skips the blocks that lie
# between documents (SDPA with a boolean mask runs its memory-efficient kernel over all of S × S). None: where
# `flex_supported` says; True/False force it (an A/B: `bench/train_device.sh` with PATCH=...; the CPU tests
# force it for the forward, as FlexAttention has no backward on the CPU).
FLEX_DOCUMENTS: bool | None = None


def flex_supported(documents: torch.Tensor, head_dim: int) -> bool:
    """Flex on CUDA with a head width its kernels take (documents come with the trainer's micro-batches, whose
    shapes do not change: one compile)."""
    if FLEX_DOCUMENTS is not None:
        return FLEX_DOCUMENTS
    return documents.is_cuda and head_dim in (16, 32, 64, 128, 256)


_compiled_flex = None  # torch.compile(flex_attention), made by the first BlockMask on CUDA (`document_mask`)


def _flex(cuda: bool):
    """FlexAttention compiled on CUDA (inside a compiled block it is traced there, the same kernel); eager
    elsewhere (which materializes the scores: the CPU tests)."""
    return _compiled_flex if cuda and _compiled_flex is not None else flex_attention


def document_mask(documents: torch.Tensor, flex: bool = False) -> torch.Tensor | BlockMask:
    """[B, S] document numbers of a packed sequence's tokens (`GPTDataset.documents`: equal within a
    document) → [B, 1, S, S] bool: query i may attend key j when j <= i and both are in one document. RoPE's
    scores depend on positions' differences only, so a document's attention is as if it started its
    sequence. flex: the same mask as FlexAttention's `BlockMask` (its 128 × 128 blocks, those wholly outside
    skipped)."""
    B, S = documents.shape
    if flex:
        global _compiled_flex
        if documents.is_cuda and _compiled_flex is None:  # here, outside the compiled blocks (~1 s the first time)
            _compiled_flex = torch.compile(flex_attention, dynamic=False)

        def same_document(b, h, q, k):
            return (k <= q) & (documents[b, q] == documents[b, k])
        return create_block_mask(same_document, B, None, S, S, device=documents.device)
    causal = torch.ones(S, S, dtype=torch.bool, device=documents.device).tril()
    return ((documents[:, :, None] == documents[:, None, :]) & causal)[:, None]
