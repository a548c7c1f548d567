"""`train.compile`: per-block torch.compile on CUDA; on CPU (CI) the run goes on eager, saying so."""

import torch
from torch import nn

from megamoe.model import compile as compile_mod
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


def test_blocks_compile_with_programmatic_dependent_launch_on_hopper_only(monkeypatch):
    """PDL is an option of inductor's default mode on Hopper and later; every option named is one
    this torch's inductor knows (torch.compile refuses unknown ones only once it compiles on the GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    options = compile_mod.compile_options(None)
    assert options == {"triton.enable_pdl": True}
    known = torch._inductor.config.get_config_copy()
    assert all(key in known for key in options)
    assert compile_mod.compile_options("reduce-overhead") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert compile_mod.compile_options(None) is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(compile_mod, "PDL", False)
    assert compile_mod.compile_options(None) is None


def test_compile_on_cpu_runs_eager_with_a_notice(tmp_path):
    proc = launch(tmp_path, 1, ["train.compile=true", "train.steps=2"])
    assert "train.compile is for CUDA; running eager on CPU" in proc.stdout
    assert len(metrics(tmp_path)) == 2
