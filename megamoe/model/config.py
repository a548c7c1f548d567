"""What the model is: the `model` and `moe` sections of a run's config.

They describe; `ModelConfig.build` constructs the plain 1-rank model, and
`ModelConfig.param_counts` counts its parameters by kind: in all or some layers (a pipeline
stage), on one rank of a tensor/expert-parallel layout, or active per token. The layout planner
(`megamoe.parallel.plan`) and the FLOP model (`megamoe.model.flops`) both count with it; a test
checks it against built models. Values are checked by the run config (`Config.validate`).
"""

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .olmoe import OLMoE


@dataclass
class MoEConfig:
    num_experts: int = 64  # 0 = dense SwiGLU FFN (the starting point for upcycling)
    top_k: int = 8
    ffn_hidden: int = 1024  # intermediate width of one expert (or of the dense FFN)
    norm_topk_prob: bool = False
    routing: str = "token_choice"  # token_choice | expert_choice
    capacity_factor: float | None = None  # None = dropless; else drop tokens past capacity
    num_shared_experts: int = 0  # always-on experts of width ffn_hidden, added to the routed output
    lb_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # f_i of the LB loss counted over: micro_batch (OLMoE) | sequence (each, averaged) |
    # global_batch (the micro-batches of every data-parallel rank together)
    lb_loss_scope: str = "micro_batch"
    # aux-loss-free balancing (DeepSeek-V3): per-expert routing bias moved this much per step; 0 = off
    bias_update_rate: float = 0.0
    # layers whose FFN is a dense SwiGLU in a MoE model (DeepSeek's first layers; Megatron's
    # moe_layer_freq): global layer indices, e.g. [0] or [0, 1]; any pattern, read as written
    dense_layers: list[int] = field(default_factory=list)
    dense_ffn_hidden: int | None = None  # their width; None = (top_k + num_shared_experts) × ffn_hidden
    router_dtype: str = "model"  # model (the training dtype) | fp32: router logits in fp32
    #                              (moe.backend=deepspeed: always fp32, its gate's own choice)
    backend: str = "megamoe"  # megamoe (own dispatch, grouped GEMM) | deepspeed (deepspeed.moe)
    # model (the training dtype) | fp8: the expert GEMMs' forward and input-gradient products in
    # float8 e4m3 with rowwise power-of-two scales (megamoe's FP8 kernel on Hopper+); weight
    # gradients stay in the training dtype
    expert_precision: str = "model"

    def dense_width(self) -> int:
        """FFN width of a dense layer: the dense model's ffn_hidden, or a MoE model's dense_ffn_hidden
        (default: the routed + shared width a token is active in, so the layer costs the same)."""
        if not self.num_experts:
            return self.ffn_hidden
        return self.dense_ffn_hidden or (self.top_k + self.num_shared_experts) * self.ffn_hidden

    def layer_ids(self, n_layers: int) -> list[int]:
        """Global indices of the layers whose FFN is a MoE, in order: the rows of the per-step loads."""
        if not self.num_experts:
            return []
        return [i for i in range(n_layers) if i not in self.dense_layers]


@dataclass
class ModelConfig:
    vocab_size: int = 50304
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 16
    head_dim: int | None = None  # default d_model // n_heads
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096
    clip_qkv: float | None = None
    init_std: float = 0.02
    # model (the training dtype) | fp8: attention's q, k, v and o projections' forward and input-gradient
    # products in float8 e4m3 with rowwise power-of-two scales (torch._scaled_mm on Hopper+); their
    # weight gradients stay in the training dtype
    attention_precision: str = "model"
    # causal | document: causal within each document of a packed sequence only (the dataset's documents,
    # whose numbers the trainer hands the model with each micro-batch), no attention across them
    attention_mask: str = "causal"

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    def build(self, moe: MoEConfig) -> "OLMoE":
        """The plain 1-rank model with MoE layers as `moe` describes (weights: `init_weights`)."""
        from .olmoe import OLMoE  # on use: describing a model needs no torch
        return OLMoE(self, moe)

    def param_counts(self, moe: MoEConfig, layers: Iterable[int] | None = None, *, embedding: bool = True,
                     head: bool = True, tp: int = 1, ep: int = 1, active: bool = False) -> dict[str, int]:
        """Parameters of the model `build(moe)` makes, by kind: of blocks `layers` (None: all),
        with the embedding and the LM head + final norm if asked, held by one rank of tensor
        parallelism `tp` (attention cut by heads, embedding and head by vocabulary) and expert
        parallelism `ep` (routed experts); `active`: routed experts top_k of num_experts."""
        d, width, f = self.d_model, self.n_heads * self.dim_per_head, moe.ffn_hidden
        layers = range(self.n_layers) if layers is None else list(layers)
        n_moe = len(set(layers) & set(moe.layer_ids(self.n_layers)))
        experts = moe.top_k if active else moe.num_experts // ep
        return {
            "embedding": self.vocab_size * d // tp if embedding else 0,
            "attention": len(layers) * 4 * d * width // tp,  # q, k, v, o
            "qk_norm": len(layers) * 2 * width // tp,
            "norms": len(layers) * 2 * d + (d if head else 0),  # the blocks' two, the final one
            "router": n_moe * moe.num_experts * d,
            "experts": n_moe * experts * 3 * d * f,  # SwiGLU: gate, up, down
            "shared_experts": n_moe * moe.num_shared_experts * 3 * d * f,
            "dense_ffn": (len(layers) - n_moe) * 3 * d * moe.dense_width(),
            "lm_head": self.vocab_size * d // tp if head else 0,
        }
