"""The model is transformers' OlmoeForCausalLM: same weights give the same logits and losses."""

import pytest
import torch
import transformers

from megamoe.checkpoint.hf import hf_config_dict, to_hf
from megamoe.config import Config, DataConfig, ModelConfig, MoEConfig
from megamoe.model.olmoe import init_weights
from megamoe.moe.router import load_balancing_loss, z_loss
from megamoe.train.loss import cross_entropy


def tiny(**moe) -> Config:
    cfg = Config(model=ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=4, max_seq_len=64),
                 moe=MoEConfig(**{**dict(num_experts=8, top_k=2, ffn_hidden=16), **moe}), data=DataConfig(seq_length=32))
    return cfg.validate()


def pair(cfg: Config, seed: int = 0):
    """Our model with random weights and transformers' model holding the same weights."""
    ours = cfg.model.build(cfg.moe)
    init_weights(ours, std=0.2, seed=seed)  # large std: routing decisions are not all ties
    hf = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**hf_config_dict(cfg)))
    state = {}
    for name, p in ours.named_parameters():
        state.update(to_hf(name, p.detach()))
    hf.load_state_dict(state, strict=True)
    return ours.eval(), hf.eval()


@pytest.mark.parametrize("variant", [
    dict(), dict(norm_topk_prob=True), dict(num_experts=4, top_k=1), dict(num_experts=16, top_k=4),
    dict(clip_qkv=0.5)])
def test_logits_match_transformers(variant):
    variant = dict(variant)
    clip = variant.pop("clip_qkv", None)
    cfg = tiny(**variant)
    cfg.model.clip_qkv = clip
    ours, hf = pair(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(tokens).logits
        b = hf(tokens).logits
    rel = (a - b).norm() / b.norm()
    assert rel < 1e-5, f"relative error {rel:.2e}"


def test_router_losses_match_transformers():
    cfg = tiny()
    ours, hf = pair(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = hf(tokens, output_router_logits=True)
        ours(tokens)
    from transformers.models.olmoe.modeling_olmoe import load_balancing_loss_func
    for layer, logits in zip(ours.moe_rows().values(), out.router_logits):
        ref_lb = load_balancing_loss_func((logits,), cfg.moe.num_experts, cfg.moe.top_k)
        ref_z = torch.logsumexp(logits.float(), -1).pow(2).mean()
        torch.testing.assert_close(layer.stats["lb_loss"], ref_lb, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(layer.stats["z_loss"], ref_z, rtol=1e-5, atol=1e-6)


def test_cross_entropy_over_targets_and_weighted_aux_loss():
    """The loss the trainer builds from the model's output: the summed cross-entropy over the
    targets / their count is transformers' LM loss; the aux loss is Σ weighted lb + z."""
    cfg = tiny()
    ours, hf = pair(cfg)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        labels = tokens[:, 1:].clone()
        labels[:, -1] = -100  # HF shifts labels itself, so it never scores the last position
        out = ours(tokens[:, :-1])
        ref = hf(tokens[:, :-1], labels=tokens[:, :-1])
    lm_loss = cross_entropy(out.logits, labels) / (labels != -100).sum()
    torch.testing.assert_close(lm_loss, ref.loss, rtol=1e-5, atol=1e-6)
    expected_aux = sum(cfg.moe.lb_loss_weight * l.stats["lb_loss"] + cfg.moe.z_loss_weight * l.stats["z_loss"]
                       for l in ours.moe_rows().values())
    torch.testing.assert_close(out.aux_loss, expected_aux)


def test_lb_and_z_loss_formulas():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    top = torch.tensor([[0], [1]])
    # f = [0.5, 0.5, 0], P = [0.4, 0.5, 0.1] -> 3 * (0.2 + 0.25) = 1.35
    assert load_balancing_loss(probs, top, 3).item() == pytest.approx(1.35)
    logits = torch.zeros(4, 3)
    assert z_loss(logits).item() == pytest.approx(torch.log(torch.tensor(3.0)).item() ** 2)


@pytest.mark.parametrize("extra", [[], ["moe.num_shared_experts=1", "model.head_dim=16"], ["moe.num_experts=0"],
                                   ["moe.dense_layers=[1]", "moe.dense_ffn_hidden=40"]])
def test_flop_model_counts_the_matmul_weights_a_token_passes_through(extra):
    """Counted from the built model's parameters: every matrix but the embedding (a lookup),
    the routed experts scaled by top_k / num_experts. The trainer's TFLOP/s and MFU rest on it."""
    from megamoe.config import load_config
    from megamoe.model.flops import flops_per_token, matmul_params_per_token
    cfg = load_config(None, ["model.vocab_size=512", "model.d_model=32", "model.n_layers=2", "model.n_heads=4",
                             "moe.num_experts=8", "moe.top_k=2", "moe.ffn_hidden=24", *extra])
    with torch.device("meta"):
        model = cfg.model.build(cfg.moe)
    touched = 0.0
    for name, p in model.named_parameters():
        if p.dim() < 2 or name == "embed.weight":
            continue
        touched += p.numel() * (cfg.moe.top_k / cfg.moe.num_experts if ".experts." in name else 1)
    assert matmul_params_per_token(cfg) == touched
    width = model.layers["0"].attn.q_proj.weight.shape[0]  # heads × head_dim
    assert flops_per_token(cfg, 16) == 6 * touched + 2 * 3 * 2 * 16 * width  # 2 layers, seq 16


def test_flop_model_gives_the_reference_numbers_for_olmoe_1b_7b():
    """../shared/DESIGN.md: ~7.9 GFLOP per token at seq 4096, from 6 × 1.18B matmul parameters
    plus causal attention."""
    from megamoe.config import load_config
    from megamoe.model.flops import flops_per_token, matmul_params_per_token
    cfg = load_config("configs/olmoe-1b-7b.yaml", [])
    assert round(matmul_params_per_token(cfg) / 1e9, 2) == 1.18
    assert round(flops_per_token(cfg, 4096) / 1e9, 1) == 7.9


def test_rope_tables_are_made_once_and_a_model_trains_after_an_inference_mode_forward():
    """The cos/sin tables of a training step are made once and shared (the same tensors at the next
    step, equal to fresh ones); tables asked for under inference mode are not kept, so a backward
    after a generation or evaluation pass under torch.inference_mode still works."""
    from megamoe.model import rope
    rope._cached_tables.cache_clear()
    first = rope.rope_cos_sin(24, 8, 10000.0, "cpu", torch.float32, 3)
    again = rope.rope_cos_sin(24, 8, 10000, torch.device("cpu"), torch.float32, 3)
    assert all(a is b for a, b in zip(first, again))
    fresh = rope._tables(24, 8, 10000.0, torch.device("cpu"), torch.float32, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, fresh))
    assert rope.rope_cos_sin(24, 8, 10000.0, "cpu", torch.float32, 0)[0] is not first[0]  # other positions
    rope._cached_tables.cache_clear()
    model, _ = pair(tiny())
    tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        model(tokens)
    model.train()
    out = model(tokens)
    (out.logits.square().mean() + out.aux_loss).backward()
    assert model.embed.weight.grad is not None



@pytest.mark.parametrize("moe", [dict(), dict(num_shared_experts=1), dict(capacity_factor=1.0)])
def test_the_moe_layers_residual_add_is_the_blocks(monkeypatch, moe):
    """A MoE block hands its residual stream to the layer (`olmoe.FUSED_RESIDUAL`; the token sum adds
    it on dropless top-k, the layer after its shared experts or other routings): in bf16 the logits
    and every gradient equal the block's own `h + y` bit for bit."""
    from megamoe.model import olmoe
    runs = []
    for fused in (True, False):
        monkeypatch.setattr(olmoe, "FUSED_RESIDUAL", fused)
        cfg = tiny(**moe)
        model = cfg.model.build(cfg.moe)
        init_weights(model, std=0.2, seed=0)
        model = model.to(torch.bfloat16)
        tokens = torch.randint(0, 96, (2, 24), generator=torch.Generator().manual_seed(3))
        out = model(tokens)
        (out.logits.float().square().mean() + out.aux_loss).backward()
        runs.append([out.logits] + [p.grad for p in model.parameters()])
    assert len(runs[0]) > 10 and all(torch.equal(a, b) for a, b in zip(*runs))


def test_document_mask_keeps_attention_within_each_packed_document():
    """model.attention_mask=document: each document of a packed sequence gets the logits it gets alone (RoPE's
    scores depend on positions' differences only; routing is per token); causal attention over the whole
    sequence lets the second document see the first."""
    from megamoe.model.attention import document_mask
    assert document_mask(torch.tensor([[0, 0, 1, 1, 1, 2]]))[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 1]]
    cfg = tiny()
    cfg.model.attention_mask = "document"
    model = cfg.model.build(cfg.moe)
    init_weights(model, std=0.2, seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(0, 90, (2, 11), generator=g), torch.randint(0, 90, (2, 13), generator=g)
    packed = torch.cat([first, second], 1)
    documents = torch.tensor([0] * 11 + [1] * 13).expand(2, -1)
    with torch.no_grad():
        causal = model(packed).logits
        masked = model(packed, documents=documents).logits
        alone = model(first).logits, model(second).logits
    torch.testing.assert_close(masked[:, :11], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(masked[:, 11:], alone[1], rtol=0, atol=1e-5)
    assert (causal[:, 11:] - alone[1]).abs().max() > 1e-2  # without the mask the first document is seen


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_document_mask_as_flex_block_mask_computes_the_same_attention(monkeypatch):
    """On a GPU the document mask is FlexAttention's BlockMask (`flex_supported`): forced here (FlexAttention
    has no backward on the CPU: a forward), the logits equal the boolean mask's through SDPA, with documents
    that straddle the 128-token blocks and one sequence of a single document; the BlockMask skips the blocks
    wholly outside each document. Off the GPU the boolean mask is what the model builds."""
    import megamoe.model.attention as A
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 90, (2, 300), generator=g)
    documents = torch.zeros(2, 300, dtype=torch.long)
    for end in (41, 171, 172):  # row 0: documents of 41, 130, 1 and 128 tokens; row 1 is one document
        documents[0, end:] += 1
    bool_mask = A.document_mask(documents)
    block_mask = A.document_mask(documents, flex=True)
    assert isinstance(block_mask, A.BlockMask) and isinstance(bool_mask, torch.Tensor)
    torch.testing.assert_close(block_mask.to_dense()[0, 0].bool(),
                               torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]], dtype=torch.bool))  # 128-blocks
    assert not A.flex_supported(documents, 64)  # on the CPU
    cfg = tiny()
    cfg.model.attention_mask = "document"
    model = cfg.model.build(cfg.moe)
    init_weights(model, std=0.2, seed=0)
    model.train()
    with torch.no_grad():
        monkeypatch.setattr(A, "FLEX_DOCUMENTS", False)
        ref = model(tokens, documents=documents).logits
        monkeypatch.setattr(A, "FLEX_DOCUMENTS", True)
        flex = model(tokens, documents=documents).logits
        causal = model(tokens).logits
    torch.testing.assert_close(flex, ref, rtol=0, atol=1e-5)
    assert (causal[0] - ref[0]).abs().max() > 1e-2  # row 0's documents are masked apart
    torch.testing.assert_close(causal[1], ref[1], rtol=0, atol=1e-5)  # row 1: one document, causal
