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


def test_apply_compile_keeps_rows_of_olmoes_width_persistent(monkeypatch):
    """`apply_compile` installs inductor's heuristics with inner (row) reductions up to PERSISTENT_ROWS
    elements persistent (inductor stops at 1,024; OLMoE's rows are 2,048): the rule, its limits, and that
    inductor then asks it, in this thread and through the config's factory (inductor's cache key)."""
    import pytest
    pytest.importorskip("torch._inductor.choices")
    from torch._inductor import config
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    import megamoe.model.compile as compile_module

    def leq(a, b):
        return a <= b
    rule = compile_module.persistent
    monkeypatch.setattr(compile_module, "PERSISTENT_ROWS", 2048)
    assert rule(ReductionHint.INNER, 2048, False, leq) is True
    assert rule(ReductionHint.INNER, 4096, False, leq) is None  # past the limit: inductor decides
    assert rule(ReductionHint.OUTER, 2048, False, leq) is None  # column reductions: inductor's rule
    assert rule(ReductionHint.INNER, 2048, True, leq) is None  # cooperative reductions split rows already
    monkeypatch.setattr(compile_module, "PERSISTENT_ROWS", 0)
    assert rule(ReductionHint.INNER, 512, False, leq) is None  # 0: inductor's heuristics untouched
    monkeypatch.setattr(compile_module, "PERSISTENT_ROWS", 2048)
    # inductor asks the installed class: a row of 2,048 its own rule leaves looping is made persistent
    from types import SimpleNamespace

    from torch._inductor.choices import InductorChoices
    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction", staticmethod(lambda f, c=False: False))
    monkeypatch.setattr(config.triton, "persistent_reductions", True)
    row = SimpleNamespace(get_reduction_hint=lambda: ReductionHint.INNER, reduction_numel=2048)
    asks = compile_module.PersistentRows.should_use_persistent_reduction
    with V.set_graph_handler(SimpleNamespace(sizevars=SimpleNamespace(statically_known_leq=leq))):
        assert asks(row, False) is True
        assert asks(row, True) is False  # cooperative: inductor's answer
        monkeypatch.setattr(compile_module, "PERSISTENT_ROWS", 0)
        assert asks(row, False) is False
    monkeypatch.setattr(compile_module, "PERSISTENT_ROWS", 2048)
    if hasattr(config, "inductor_choices_class"):  # restored after the test
        monkeypatch.setattr(config, "inductor_choices_class", config.inductor_choices_class)
    model = ModelConfig(vocab_size=64, d_model=16, n_layers=1, n_heads=2).build(
        MoEConfig(num_experts=4, top_k=2, ffn_hidden=8))
    apply_compile(model)
    assert isinstance(V.choices, compile_module.PersistentRows)
    if hasattr(config, "inductor_choices_class"):
        assert config.inductor_choices_class is compile_module.PersistentRows
        assert compile_module.PersistentRows().uuid() == "megamoe.PersistentRows(2048)"
