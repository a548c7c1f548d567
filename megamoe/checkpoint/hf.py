"""megamoe canonical tensors ↔ transformers `OlmoeForCausalLM` (config and state dict).

Canonical names are megamoe's full (unsharded) parameter names. transformers 5 stores the
experts stacked (`mlp.experts.gate_up_proj` [E, 2F, d], `down_proj` [E, d, F]); published
OLMoE checkpoints (transformers 4.x) store them per expert (`mlp.experts.{j}.gate_proj` ...).
"""

import re

import torch

from ..config import Config
from ..model.config import ModelConfig, MoEConfig

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "ffn.router.weight": "mlp.gate.weight",
}
_TOP_MAP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
            "lm_head.weight": "lm_head.weight"}


def hf_config_dict(cfg: Config) -> dict:
    """Keyword arguments for transformers.OlmoeConfig describing the same model."""
    m, moe = cfg.model, cfg.moe
    return dict(vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=moe.ffn_hidden,
                num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
                num_key_value_heads=m.n_heads, head_dim=m.dim_per_head,
                max_position_embeddings=m.max_seq_len, rms_norm_eps=m.rms_norm_eps,
                rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
                clip_qkv=m.clip_qkv, num_experts=moe.num_experts, num_experts_per_tok=moe.top_k,
                norm_topk_prob=moe.norm_topk_prob, router_aux_loss_coef=moe.lb_loss_weight,
                tie_word_embeddings=False, attention_bias=False, initializer_range=m.init_std)


def config_from_hf(hf: dict) -> tuple[ModelConfig, MoEConfig]:
    """ModelConfig and MoEConfig from a transformers OLMoE config.json dict."""
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    head_dim = hf.get("head_dim")
    if head_dim == hf["hidden_size"] // hf["num_attention_heads"]:
        head_dim = None  # megamoe's default: written only when it differs
    if hf.get("num_key_value_heads", hf["num_attention_heads"]) != hf["num_attention_heads"]:
        raise ValueError("num_key_value_heads differs from num_attention_heads: megamoe's OLMoE "
                         "has no grouped-query attention")
    model = ModelConfig(vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
                        n_layers=hf["num_hidden_layers"], n_heads=hf["num_attention_heads"],
                        head_dim=head_dim, rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
                        rope_theta=float(theta), max_seq_len=hf.get("max_position_embeddings", 4096),
                        clip_qkv=hf.get("clip_qkv"), init_std=hf.get("initializer_range", 0.02))
    moe = MoEConfig(num_experts=hf["num_experts"], top_k=hf["num_experts_per_tok"],
                    ffn_hidden=hf["intermediate_size"], norm_topk_prob=hf.get("norm_topk_prob", False),
                    lb_loss_weight=hf.get("router_aux_loss_coef", 0.01))
    return model, moe


def to_hf(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One canonical tensor → its transformers 5 (stacked experts) tensor(s)."""
    if name in _TOP_MAP:
        return {_TOP_MAP[name]: tensor}
    i, rest = _split_layer(name)
    prefix = f"model.layers.{i}."
    if rest == "ffn.experts.w1":  # [E, d, 2F] -> [E, 2F, d]
        return {prefix + "mlp.experts.gate_up_proj": tensor.transpose(1, 2).contiguous()}
    if rest == "ffn.experts.w2":  # [E, F, d] -> [E, d, F]
        return {prefix + "mlp.experts.down_proj": tensor.transpose(1, 2).contiguous()}
    return {prefix + _LAYER_MAP[rest]: tensor}


def from_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers OLMoE state dict (stacked or per-expert layout) → canonical tensors."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer = {v: k for k, v in _LAYER_MAP.items()}
    out, per_expert = {}, {}
    for key, t in state.items():
        if key in top:
            out[top[key]] = t
            continue
        m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
        if m is None:
            raise KeyError(f"unexpected tensor {key!r} in a transformers OLMoE checkpoint")
        i, rest = m.groups()
        if rest == "mlp.experts.gate_up_proj":
            out[f"layers.{i}.ffn.experts.w1"] = t.transpose(1, 2)
        elif rest == "mlp.experts.down_proj":
            out[f"layers.{i}.ffn.experts.w2"] = t.transpose(1, 2)
        elif (e := re.fullmatch(r"mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", rest)):
            per_expert.setdefault(int(i), {}).setdefault(int(e.group(1)), {})[e.group(2)] = t
        elif rest in layer:
            out[f"layers.{i}.{layer[rest]}"] = t
        else:
            raise KeyError(f"unexpected tensor {key!r} in a transformers OLMoE checkpoint")
    for i, experts in per_expert.items():
        ids = sorted(experts)
        out[f"layers.{i}.ffn.experts.w1"] = torch.stack(
            [torch.cat([experts[j]["gate"], experts[j]["up"]], 0).t() for j in ids])
        out[f"layers.{i}.ffn.experts.w2"] = torch.stack([experts[j]["down"].t() for j in ids])
    return out


def to_hf_per_expert(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """One canonical tensor → transformers 4.x per-expert tensors (published OLMoE layout)."""
    if not name.endswith(("ffn.experts.w1", "ffn.experts.w2")):
        return to_hf(name, tensor)
    i, rest = _split_layer(name)
    out = {}
    for j, w in enumerate(tensor):
        base = f"model.layers.{i}.mlp.experts.{j}."
        if rest.endswith("w1"):
            gate, up = w.t().chunk(2, dim=0)  # [F, d] each
            out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate.contiguous(), up.contiguous()
        else:
            out[base + "down_proj.weight"] = w.t().contiguous()
    return out


def _split_layer(name: str) -> tuple[str, str]:
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m is None:
        raise KeyError(f"{name!r} is not a megamoe OLMoE parameter")
    return m.group(1), m.group(2)
