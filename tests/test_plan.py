"""megamoe-plan: its parameter counts are what each rank of a layout really holds."""

import re
import subprocess
import sys

import pytest
import torch

from distributed import run_ranks
from megamoe.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, load_config
from megamoe.parallel.plan import params_per_stage, plan_layouts, stage_param_counts
from megamoe.parallel.state import ParallelState
from megamoe.train.engine import build_model


def tiny(**moe) -> Config:
    moe = {**dict(num_experts=8, top_k=2, ffn_hidden=16, num_shared_experts=1), **moe}
    return Config(model=ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, max_seq_len=16),
                  moe=MoEConfig(**moe), data=DataConfig(seq_length=16))


def count_params(rank: int, world_size: int, cfg: Config, tp: int, pp: int, ep: int) -> tuple[int, int]:
    state = ParallelState(world_size, rank, tp, pp, ep).build_groups()
    model = build_model(cfg, state)
    return state.pp_rank, sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("tp,pp,ep,moe", [
    (2, 2, 1, {}), (1, 2, 2, {}), (2, 1, 2, {}), (1, 1, 4, {}),
    (2, 2, 1, {"num_experts": 0}),  # a dense model (the upcycling start)
    (1, 2, 2, {"dense_layers": [0, 1, 3], "dense_ffn_hidden": 24}),  # dense layers: stage 0 has no MoE
])
def test_counts_equal_the_built_layout(tp, pp, ep, moe):
    cfg = tiny(**moe)
    expected = params_per_stage(cfg, tp, pp, ep)
    for stage, n in run_ranks(count_params, 4, cfg, tp, pp, ep):
        assert n == expected[stage]


KINDS = {  # parameter name -> its kind in ModelConfig.param_counts
    r"embed\.weight": "embedding", r"lm_head\.weight": "lm_head",
    r"(layers\.\d+\.(attn|ffn)_)?norm\.weight": "norms", r"layers\.\d+\.attn\.[qk]_norm\.weight": "qk_norm",
    r"layers\.\d+\.attn\.[qkvo]_proj\.weight": "attention", r"layers\.\d+\.ffn\.router\.weight": "router",
    r"layers\.\d+\.ffn\.experts\.w[12]": "experts", r"layers\.\d+\.ffn\.shared\.w[12]": "shared_experts",
    r"layers\.\d+\.ffn\.w[12]": "dense_ffn",
}


@pytest.mark.parametrize("moe", [{}, {"num_experts": 0}, {"dense_layers": [0, 2], "dense_ffn_hidden": 24},
                                 {"num_shared_experts": 0, "top_k": 3}])
def test_param_counts_are_the_built_models_total_and_active(moe):
    """ModelConfig.param_counts, which the planner and the FLOP model count with: each kind is
    the built model's parameters of that kind; active, the routed experts count top_k of E."""
    cfg = tiny(**moe)
    with torch.device("meta"):
        model = cfg.model.build(cfg.moe)
    built = dict.fromkeys(cfg.model.param_counts(cfg.moe), 0)
    for name, p in model.named_parameters():
        (kind,) = [kind for pattern, kind in KINDS.items() if re.fullmatch(pattern, name)]
        built[kind] += p.numel()
    assert cfg.model.param_counts(cfg.moe) == built
    assert sum(built.values()) == sum(p.numel() for p in model.parameters())
    share = cfg.moe.top_k / cfg.moe.num_experts if cfg.moe.num_experts else 0
    active = sum(cfg.model.param_counts(cfg.moe, active=True).values())
    assert active == sum(built.values()) - built["experts"] * (1 - share)


def test_one_rank_holds_the_whole_model_and_layouts_are_valid():
    cfg = tiny()
    assert params_per_stage(cfg, 1, 1, 1) == [sum(p.numel() for p in cfg.model.build(cfg.moe).parameters())]
    plans = plan_layouts(cfg, 8)
    assert {(p.tp, p.pp, p.ep) for p in plans} >= {(1, 1, 8), (2, 2, 2), (1, 4, 2)}
    assert all(p.tp * p.pp * p.dp == 8 and p.dp % p.ep == 0 for p in plans)
    assert [p.state_gib for p in plans] == sorted(p.state_gib for p in plans)


def test_cli_lists_olmoe_layouts_and_marks_what_does_not_fit():
    out = subprocess.run([sys.executable, "-m", "megamoe.cli.plan", "--config", "olmoe-1b-7b",
                          "--world-size", "8", "--gpu-gib", "80"], capture_output=True, text=True, check=True).stdout
    assert "6.919B" in out  # tensor 1 pipeline 1 expert 1 data 8: the whole model on each rank
    rows = {tuple(line.split()[:4]): line for line in out.splitlines()[1:]}
    assert rows[("8", "1", "1", "1")].endswith("96.9  (does not fit)")
    assert rows[("4", "1", "1", "2")].endswith("61.1  (tight: activations get < 1/4)")
    assert rows[("1", "1", "8", "8")].endswith("14.4")


def test_fp8_weight_cache_is_counted_per_layout():
    """FP8 experts over several micro-batches a step keep their weights quantized: 2 bytes a rank's expert
    parameter on top of the bf16 state, in every layout whose step has more than one micro-batch; none
    with `train.fp8_weight_cache=false` or one micro-batch a step (here at data parallelism 8)."""
    base = load_config("olmoe-1b-7b", ["train.global_batch_size=32", "train.micro_batch_size=4"])
    fp8 = load_config("olmoe-1b-7b", ["train.global_batch_size=32", "train.micro_batch_size=4",
                                      "moe.expert_precision=fp8"])
    off = load_config("olmoe-1b-7b", ["train.global_batch_size=32", "train.micro_batch_size=4",
                                      "moe.expert_precision=fp8", "train.fp8_weight_cache=false"])
    plain = {(p.tp, p.pp, p.ep): p.state_gib for p in plan_layouts(base, 8)}
    assert {(p.tp, p.pp, p.ep): p.state_gib for p in plan_layouts(off, 8)} == plain
    seen = set()
    for p in plan_layouts(fp8, 8):
        experts = max(c["experts"] for c in stage_param_counts(fp8, p.tp, p.pp, p.ep))
        cache = 2 * experts / 2**30 if 32 // (4 * p.dp) > 1 else 0.0
        assert p.state_gib == pytest.approx(plain[(p.tp, p.pp, p.ep)] + cache, rel=1e-12), (p.tp, p.pp, p.ep)
        seen.add(cache > 0)
    assert seen == {True, False}  # dp 8 runs one micro-batch a step: no cache


def test_fp8_attention_cache_is_counted_on_one_tensor_parallel_rank():
    """FP8 attention projections keep their quantized weights too (2 bytes a rank's attention parameter) where
    the model is not cut by TP; the TP layers quantize per call and keep nothing."""
    batch = ["train.global_batch_size=32", "train.micro_batch_size=4"]
    base = {(p.tp, p.pp, p.ep): p.state_gib for p in plan_layouts(load_config("olmoe-1b-7b", batch), 8)}
    cfg = load_config("olmoe-1b-7b", [*batch, "model.attention_precision=fp8"])
    seen = set()
    for p in plan_layouts(cfg, 8):
        attention = max(c["attention"] for c in stage_param_counts(cfg, p.tp, p.pp, p.ep))
        cache = 2 * attention / 2**30 if p.tp == 1 and 32 // (4 * p.dp) > 1 else 0.0
        assert p.state_gib == pytest.approx(base[(p.tp, p.pp, p.ep)] + cache, rel=1e-12), (p.tp, p.pp, p.ep)
        seen.add((p.tp == 1, cache > 0))
    assert (True, True) in seen and (False, False) in seen


def test_no_valid_layout_says_why_each_failed():
    with pytest.raises(ConfigError) as e:
        plan_layouts(load_config("olmoe-1b-7b"), 3)
    assert str(e.value).startswith("no layout of 3 ranks is valid for this config: ")
    assert "tensor=3 pipeline=1 expert=1: parallel.tensor: n_heads=16 is not divisible by tensor=3" in str(e.value)
    assert "tensor=1 pipeline=1 expert=1: train.global_batch_size: 512 is not a multiple" in str(e.value)
