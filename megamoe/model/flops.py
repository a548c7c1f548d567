"""Model FLOPs per token and the GPUs' bf16 peaks: the trainer's TFLOP/s and MFU.

The count is the usual one (PaLM appendix B; Megatron's `num_floating_point_operations`):
6 × the matmul parameters one token passes through (forward 2, backward 4), plus causal
attention's scores and values. Only the routed experts a token visits count (top_k of
num_experts, plus shared experts), so an MoE is charged for its active parameters (counted by
`ModelConfig.param_counts`, as the layout planner counts). Norms, softmax, RoPE and the
dispatch's gathers are left out, as everyone leaves them out; so is the embedding, a lookup.
"""

import torch

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity) from the vendors' data sheets. Matched
# as substrings of torch.cuda.get_device_name(), most specific first.
_BF16_PEAKS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
               ("GH200", 989e12), ("A100", 312e12), ("B200", 2250e12)]
_MATMULS = ("attention", "router", "experts", "shared_experts", "dense_ffn", "lm_head")


def matmul_params_per_token(cfg) -> int:
    """Matmul weights one token passes through: attention, router, its experts (or a dense
    layer's FFN), the LM head."""
    counts = cfg.model.param_counts(cfg.moe, active=True)
    return sum(counts[kind] for kind in _MATMULS)


def flops_per_token(cfg, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length `seq_len`.

    Attention: per layer and token, scores and values cost 2·2·S·width forward, half of it
    under the causal mask; × 3 for forward + backward.
    """
    width = cfg.model.n_heads * cfg.model.dim_per_head
    return 6.0 * matmul_params_per_token(cfg) + cfg.model.n_layers * 3 * 2 * seq_len * width


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None where unknown (CPU, fp32, other GPUs)."""
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _BF16_PEAKS if key in name), None)
