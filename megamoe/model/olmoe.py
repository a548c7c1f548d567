"""The OLMoE decoder, in plain PyTorch: it knows nothing of parallelism.

Numerically it is transformers' `OlmoeForCausalLM` (tests compare logits and losses):
pre-norm blocks of attention (QK-norm, RoPE) and a MoE FFN, a final RMSNorm and an
untied LM head. Parallel layouts are applied afterwards by `megamoe.parallel` functions.
"""

import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..moe.experts import SwiGLU
from ..moe.layer import MoELayer
from ..sharding import full_shape, local_slice
from .attention import Attention
from .config import ModelConfig, MoEConfig
from .norm import RMSNorm
from .rope import rope_cos_sin


class Block(nn.Module):
    def __init__(self, m: ModelConfig, moe: MoEConfig, index: int):
        super().__init__()
        self.attn_norm = RMSNorm(m.d_model, m.rms_norm_eps)
        self.attn = Attention(m.d_model, m.n_heads, m.dim_per_head, m.rms_norm_eps, m.clip_qkv)
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

    def forward(self, h: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """h: [B, S, d] -> (h, this block's weighted MoE auxiliary loss)."""
        h = h + self.attn(self.attn_norm(h), cos, sin)
        out = self.ffn(self.ffn_norm(h))
        y, aux = out if isinstance(out, tuple) else (out, h.new_zeros(()))
        return h + y, aux


@dataclass
class Output:
    logits: torch.Tensor | None    # [B, S, V] (vocab-local under TP); None before the last stage
    aux_loss: torch.Tensor         # Σ over (this stage's) layers of weighted LB + z losses
    loss: torch.Tensor | None = None     # lm_loss + aux_loss, when labels are given
    lm_loss: torch.Tensor | None = None  # mean cross-entropy
    hidden: torch.Tensor | None = None   # [B, S, d]: a non-last pipeline stage's output


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Token cross-entropy in fp32, mean or sum; logits [N, V], labels [N] (-100 is ignored)."""
    return F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction=reduction)


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
        self.loss_fn = cross_entropy  # tensor parallelism swaps in the vocab-parallel one
        # None: lm_loss is the mean over this micro-batch's targets. A number D: the sum over
        # them / D. The trainer sets D for loss-masked data, so that every target of a step
        # weighs the same however the batch is split into micro-batches and ranks.
        self.loss_denominator: float | None = None

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                position_offset: int = 0, hidden: torch.Tensor | None = None) -> Output:
        """tokens, labels: [B, S] (labels already shifted; -100 is ignored).

        A pipeline stage without `embed` starts from the previous stage's `hidden` [B, S, d];
        one without `lm_head` returns its blocks' output as `Output.hidden`."""
        m = self.cfg
        h = self.embed(tokens) if hidden is None else hidden  # [B, S, d]
        cos, sin = rope_cos_sin(tokens.shape[1], m.dim_per_head, m.rope_theta, tokens.device,
                                h.dtype, position_offset)
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.layers.values():
            h, block_aux = block(h, cos, sin)
            aux = aux + block_aux
        if self.lm_head is None:
            return Output(logits=None, aux_loss=aux, hidden=h)
        logits = self.lm_head(self.norm(h))
        out = Output(logits=logits, aux_loss=aux)
        if labels is not None:
            if self.loss_denominator is None:
                out.lm_loss = self.loss_fn(logits.flatten(0, 1), labels.flatten())
            else:
                out.lm_loss = self.loss_fn(logits.flatten(0, 1), labels.flatten(),
                                           reduction="sum") / self.loss_denominator
            out.loss = out.lm_loss + aux
        return out

    def moe_layers(self) -> list[nn.Module]:
        """The MoE FFNs (either backend): each keeps its last forward's routing `stats`."""
        return [b.ffn for b in self.layers.values() if hasattr(b.ffn, "stats")]

    def moe_rows(self) -> dict[int, nn.Module]:
        """This stage's MoE FFNs by their row in the trainer's per-step [MoE layers, E] loads
        (their place among all the model's MoE layers: `MoEConfig.layer_ids`)."""
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
