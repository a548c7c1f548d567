"""`model.attention_precision: fp8`: attention's q, k, v and o as FP8 products (`megamoe.model.fp8_linear`).

The CPU path computes the function the GPU's `torch._scaled_mm` does, from the same e4m3 values: these
tests hold it to an explicit quantize-dequantize reference; the layouts' equality is in
tests/test_parallel_matrix.py, the GPU's product against this path in `test_the_gpu_product_is_the_reference`.
"""

import pytest
import torch

from megamoe.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig
from megamoe.model.fp8_linear import Linear, fp8_linear
from megamoe.model.olmoe import init_weights
from megamoe.moe.fp8 import quantize


def dequantized(t: torch.Tensor, dim: int = -1) -> torch.Tensor:
    q, inv = quantize(t, dim)
    return q.float() * inv


def test_the_products_are_of_the_quantized_operands():
    """forward q(x)·q(w)ᵀ (x per token, w per output feature), input gradient q(g)·q(wᵀ)ᵀ (g per token, w per
    input feature), weight gradient gᵀ·x unquantized."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 64, generator=g, requires_grad=True)
    w = torch.randn(48, 64, generator=g, requires_grad=True)
    y = fp8_linear(x, w)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)
    x2, g2, wd = x.detach().reshape(-1, 64), grad.reshape(-1, 48), w.detach()
    assert y.shape == (2, 7, 48) and x.grad.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 48), dequantized(x2) @ dequantized(wd).t(), rtol=0, atol=0)
    torch.testing.assert_close(x.grad.reshape(-1, 64), dequantized(g2) @ dequantized(wd.t().contiguous()).t(),
                               rtol=0, atol=0)
    torch.testing.assert_close(w.grad, g2.t() @ x2, rtol=0, atol=0)
    exact = x2 @ wd.t()
    assert 1e-3 < float((y.detach().reshape(-1, 48) - exact).norm() / exact.norm()) < 0.1  # quantized: near, not equal


def test_the_layer_keeps_nn_linears_parameter_and_switch():
    plain, fp8 = Linear(64, 32), Linear(64, 32, fp8=True)
    assert not plain.fp8 and fp8.fp8 and plain.bias is None
    assert list(plain.state_dict()) == list(fp8.state_dict()) == ["weight"]  # checkpoints and HF names unchanged
    fp8.load_state_dict(plain.state_dict())
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(plain(x), x @ plain.weight.t())
    torch.testing.assert_close(fp8(x), fp8_linear(x, plain.weight), rtol=0, atol=0)
    assert not torch.equal(fp8(x), plain(x))


def test_the_cached_weight_forms_give_the_same_products():
    """`cache_fp8_weights` quantizes the FP8 projections' weights once (with the FP8 experts'); until
    `release_fp8_weights` the layer reads those forms and computes what quantizing per call does; a weight
    changed after the release is quantized afresh."""
    from megamoe.moe.experts import cache_fp8_weights, release_fp8_weights
    cfg = small("fp8")
    model = cfg.model.build(cfg.moe)
    init_weights(model, std=0.02, seed=5)
    layer = model.layers["0"].attn.q_proj
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(6), requires_grad=True)
    want = layer(x)
    want_dx, want_dw = torch.autograd.grad(want.square().sum(), (x, layer.weight))
    assert cache_fp8_weights(model) and layer.fp8_cache_valid
    assert sum(isinstance(m, Linear) and m.fp8_cache_valid for m in model.modules()) == 8  # q, k, v, o × 2 layers
    got = layer(x)
    got_dx, got_dw = torch.autograd.grad(got.square().sum(), (x, layer.weight))
    for a, b in ((got, want), (got_dx, want_dx), (got_dw, want_dw)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        layer.weight.mul_(3.0)
    assert torch.equal(layer(x), got)  # still the cached forms (the trainer releases before the update)
    release_fp8_weights(model)
    assert not layer.fp8_cache_valid
    torch.testing.assert_close(layer(x), fp8_linear(x, layer.weight), rtol=0, atol=0)
    assert not torch.equal(layer(x), got)
    buffers = [t.data_ptr() for t in layer.fp8_cache]
    cache_fp8_weights(model)  # the next step's forms, written into the same tensors (compiled graphs read them)
    assert [t.data_ptr() for t in layer.fp8_cache] == buffers
    torch.testing.assert_close(layer(x), fp8_linear(x, layer.weight), rtol=0, atol=0)


def small(attention_precision: str) -> Config:
    return Config(model=ModelConfig(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=64,
                                    attention_precision=attention_precision),
                  moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden=16), data=DataConfig(seq_length=32)).validate()


def test_the_model_runs_its_projections_in_fp8_and_nothing_else():
    """The same weights give a loss within quantization's reach of the bf16 projections' and the same
    parameter names; the experts, router and LM head are untouched (only Attention's four are FP8)."""
    models = {}
    for precision in ("model", "fp8"):
        cfg = small(precision)
        models[precision] = cfg.model.build(cfg.moe)
        init_weights(models[precision], std=0.02, seed=3)
    plain, fp8 = models["model"], models["fp8"]
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in fp8.named_parameters()]
    fp8_names = sorted(n for n, m in fp8.named_modules() if getattr(m, "fp8", False) and isinstance(m, Linear))
    assert fp8_names == sorted(f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkvo")
    tokens = torch.randint(0, 96, (2, 32), generator=torch.Generator().manual_seed(4))
    a, b = plain(tokens).logits, fp8(tokens).logits  # what each attention adds is quantized
    assert 0 < float((a - b).detach().norm() / a.detach().norm()) < 0.05
    b.float().square().mean().backward()  # the backward runs through every FP8 projection
    assert all(p.grad is not None for p in fp8.parameters() if p.requires_grad)


@pytest.mark.parametrize("overrides,message", [
    (dict(attention_precision="fp4"), "must be one of model, fp8"),
    (dict(attention_precision="fp8", n_heads=4), "divisible by 16"),  # head_dim 8
])
def test_bad_attention_precision_is_refused(overrides, message):
    m = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=2, max_seq_len=64)
    with pytest.raises(ConfigError, match=rf"^model.attention_precision: .*{message}"):
        Config(model=ModelConfig(**{**m, **overrides}), moe=MoEConfig(num_experts=8, top_k=2, ffn_hidden=16),
               data=DataConfig(seq_length=32)).validate()


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0),
                    reason="torch._scaled_mm's rowwise FP8 product needs a Hopper-or-later GPU")
def test_the_gpu_product_is_the_reference():
    """On the GPU both products are torch._scaled_mm of the same e4m3 operands: within fp32 accumulation's
    rounding of the dequantized reference, then rounded to bf16."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(512, 256, device="cuda", generator=g).bfloat16().requires_grad_()
    w = (torch.randn(384, 256, device="cuda", generator=g) * 0.02).bfloat16().requires_grad_()
    y = fp8_linear(x, w)
    grad = torch.randn(y.shape, device="cuda", generator=g).bfloat16()
    y.backward(grad)
    want = dequantized(x.detach()) @ dequantized(w.detach()).t()
    torch.testing.assert_close(y.float(), want, rtol=1e-2, atol=1e-2 * float(want.abs().max()))
    want_dx = dequantized(grad) @ dequantized(w.detach().t().contiguous()).t()
    torch.testing.assert_close(x.grad.float(), want_dx, rtol=1e-2, atol=1e-2 * float(want_dx.abs().max()))
    torch.testing.assert_close(w.grad.float(), grad.float().t() @ x.detach().float(), rtol=2e-2, atol=1e-1)
