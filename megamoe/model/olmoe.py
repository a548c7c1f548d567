"""The OLMoE decoder, in plain PyTorch: it knows nothing of parallelism.

Numerically it is transformers' `OlmoeForCausalLM` (tests compare logits and losses):
pre-norm blocks of attention (QK-norm, RoPE) and a MoE FFN, a final RMSNorm and an
untied LM head. Parallel layouts are applied afterwards by `megamoe.parallel` functions.
"""

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from ..moe.experts import SwiGLU
from ..moe.layer import MoELayer
from ..sharding import full_shape, local_slice
from .attention import Attention, document_mask, flex_supported
from .config import ModelConfig, MoEConfig
from .norm import RMSNorm
from .rope import rope_cos_sin


# MoE blocks hand their residual stream to the MoE layer, whose token sum adds it (one pass less a
# block); False: the block adds it (for A/B runs)
FUSED_RESIDUAL = True


class Block(nn.Module):
    def __init__(self, m: ModelConfig, moe: MoEConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(m.d_model, m.rms_norm_eps)
        self.attn = Attention(m.d_model, m.n_heads, m.dim_per_head, m.rms_norm_eps, m.clip_qkv,
                              m.attention_precision == "fp8")
        self.ffn_norm = RMSNorm(m.d_model, m.rms_norm_eps)
        if not moe.num_experts or index in moe.dense_layers:
            self.ffn = SwiGLU(m.d_model, moe.dense_width())
        elif moe.backend == "deepspeed":
            from ..moe.deepspeed_backend import build_deepspeed_moe
            self.ffn = build_deepspeed_moe(m.d_model, moe)  # deepspeed.moe.layer.MoE behind MoELayer's contract
        else:
            self.ffn = MoELayer(m.d_model, moe.num_experts, moe.top_k, moe.ffn_hidden, moe.routing,
                                moe.capacity_factor, moe.norm_topk_prob, moe.num_shared_experts,
                                moe.lb_loss_weight, moe.z_loss_weight, moe.lb_loss_scope,
                                moe.bias_update_rate > 0, moe.router_dtype, moe.expert_precision)

    def forward(self, h: torch.Tensor, cos, sin, mask=None) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, S, d] -> (h, this block's weighted MoE auxiliary loss); mask: attention's (None: causal)."""
        h = h + self.attn(self.attn_norm(h), cos, sin, mask)
        if isinstance(self.ffn, MoELayer) and FUSED_RESIDUAL:  # h + y in the combine's own pass
            return self.ffn(self.ffn_norm(h), residual=h)
        out = self.ffn(self.ffn_norm(h))
        y, aux = out if isinstance(out, tuple) else (out, h.new_zeros(()))
        return h + y, aux


@dataclass
class Output:
    logits: torch.Tensor    # [B, S, V] (vocab-local under TP); a pipeline stage before the last
                            # returns its blocks' output [B, S, d] (S/tp under SP) here instead
    aux_loss: torch.Tensor  # Σ over (this stage's) layers of the weighted LB + z losses


class OLMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoEConfig):
        """Usually made by `cfg.build(moe)`; the model's own configs, not the run's."""
        super().__init__()
        self.cfg, self.moe_cfg = cfg, moe
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        # keyed by global index, so a pipeline stage holding some blocks keeps canonical names
        self.layers = nn.ModuleDict({str(i): Block(cfg, moe, i) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, position_offset: int = 0,
                hidden: torch.Tensor | None = None, project: bool = True,
                documents: torch.Tensor | None = None) -> Output:
        """tokens [B, S] -> logits and the auxiliary loss; the loss is the trainer's.

        documents [B, S]: each token's document number in a packed sequence (the trainer's, under
        `model.attention_mask=document`): attention within each document. None: causal over all of it.

        A pipeline stage without `embed` starts from the previous stage's `hidden` [B, S, d].
        project=False: `Output.logits` holds the final-normed hidden states [B, S, d], which
        the trainer's loss projects with `lm_head.weight` itself (`train/loss.py`)."""
        m = self.cfg
        h = self.embed(tokens) if hidden is None else hidden  # [B, S, d]
        cos, sin = rope_cos_sin(tokens.shape[1], m.dim_per_head, m.rope_theta, tokens.device,
                                h.dtype, position_offset)
        aux = h.new_zeros((), dtype=torch.float32)
        mask = None if documents is None else document_mask(
            documents, flex_supported(documents, m.dim_per_head))
        for block in self.layers.values():
            h, block_aux = block(h, cos, sin, mask)
            aux = aux + block_aux
        h = self.norm(h)
        return Output(logits=self.lm_head(h) if project else h, aux_loss=aux)

    def moe_rows(self) -> dict[int, nn.Module]:
        """This stage's MoE FFNs (either backend; each keeps its last forward's routing `stats`),
        in layer order, by their row in the trainer's per-step [MoE layers, E] loads (their
        place among all the model's MoE layers: `MoEConfig.layer_ids`)."""
        row = {layer: r for r, layer in enumerate(self.moe_cfg.layer_ids(self.cfg.n_layers))}
        return {row[int(key)]: b.ffn for key, b in self.layers.items() if hasattr(b.ffn, "stats")}


def init_weights(model: nn.Module, std: float, seed: int) -> None:
    """Layout-independent init: every parameter is drawn whole from a generator seeded by its
    name, then cut to this rank's shard (see `megamoe.sharding`), so any layout starts
    from the same weights as one rank."""
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.copy_(local_slice(p, initial_value(name, full_shape(p), std, seed)).to(p.dtype))


def initial_value(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    """The full initial tensor of parameter `name`: ones for a norm's weight, else N(0, std²)
    drawn on the CPU from a generator seeded by (`seed`, `name`)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape)
    g = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)
    return torch.randn(shape, generator=g) * std
