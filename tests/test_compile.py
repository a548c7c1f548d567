"""`train.compile`: per-block torch.compile on CUDA; on CPU (CI) the run goes on eager, saying so."""

from torch import nn

from megamoe.model.compile import apply_compile
from megamoe.model.config import ModelConfig, MoEConfig
from runs import launch, metrics


def test_apply_compile_wraps_every_block_and_keeps_names():
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2).build(
        MoEConfig(num_experts=4, top_k=2, ffn_hidden=8))
    names = [n for n, _ in model.named_parameters()]
    apply_compile(model)
    assert [n for n, _ in model.named_parameters()] == names
    blocks = model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers
    assert all(b._compiled_call_impl is not None for b in blocks)


def test_compile_on_cpu_runs_eager_with_a_notice(tmp_path):
    proc = launch(tmp_path, 1, ["train.compile=true", "train.steps=2"])
    assert "train.compile is for CUDA; running eager on CPU" in proc.stdout
    assert len(metrics(tmp_path)) == 2
