"""Checkpoint tools: any layout continues in any other, transformers OLMoE both ways, upcycling.

One real run (EP2 × ZeRO-1 on 2 CPU ranks, 6 steps, checkpoints at 3 and 6) is the source of
every test; the others convert it, continue it in another layout, or break it on purpose.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors import safe_open

from megamoe.checkpoint.canonical import load_canonical, resolve, write_run
from megamoe.checkpoint.files import CheckpointError, ShardedReader, read_meta
from megamoe.checkpoint.hf_dirs import export_hf, import_hf
from megamoe.checkpoint.reshard import reshard
from megamoe.checkpoint.upcycle import upcycle
from megamoe.config import ConfigError, load_config
from megamoe.inference.load import load_model, tokenizer_for
from megamoe.model.olmoe import init_weights
from pip_cache import pip_target
from runs import TINY, assert_close_but_rounding, launch, metrics

LAYOUT_A = ["parallel.expert=2", "parallel.zero_stage=1"]
SIX_STEPS = ["train.steps=6", "train.save_interval=3"]


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    run = tmp_path_factory.mktemp("a") / "run"
    launch(run, 2, [*LAYOUT_A, *SIX_STEPS])
    return run


def tokens(cfg, seed=0):
    return torch.randint(0, cfg.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(seed))


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def moments(step_dir):
    meta = read_meta(step_dir)
    with ShardedReader(step_dir, meta, "optim") as r:
        return {n: r.read(n) for n in r.names()}


def test_reshard_continues_the_same_loss_curve_optimizer_included(run_a, tmp_path):
    """EP2×ZeRO-1 for 3 steps, then TP2 (ZeRO 0) for 3 more: the curve of staying at EP2×ZeRO-1."""
    b = tmp_path / "b"
    reshard(run_a / "checkpoints" / "step_00000003", b,
            ["parallel.expert=1", "parallel.zero_stage=0", "parallel.tensor=2"], world_size=2, progress=False)
    launch(b, 2, ["parallel.tensor=2", *SIX_STEPS])
    stayed = {r["step"]: r for r in metrics(run_a)}
    moved = metrics(b)
    assert [r["step"] for r in moved] == [4, 5, 6]
    for r in moved:
        assert r["loss"] == pytest.approx(stayed[r["step"]]["loss"], rel=1e-5), r["step"]
        assert r["grad_norm"] == pytest.approx(stayed[r["step"]]["grad_norm"], rel=1e-4), r["step"]
    wa, wb = load_canonical(run_a)[0], load_canonical(b)[0]
    ma, mb = moments(run_a / "checkpoints" / "step_00000006"), moments(b / "checkpoints" / "step_00000006")
    assert wa.keys() == wb.keys() and ma.keys() == mb.keys() and len(ma) == 2 * len(wa)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-6, msg=name)
    for name in ma:
        assert_close_but_rounding(mb[name], ma[name], 1e-3, 1e-9, name)


@pytest.mark.parametrize("layout", ["per-expert", "stacked"])
def test_to_hf_loads_in_transformers_with_the_same_logits(run_a, tmp_path, layout):
    out = export_hf(run_a, tmp_path / "hf", expert_layout=layout, progress=False)
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    expert_key = {"per-expert": "model.layers.0.mlp.experts.7.gate_proj.weight",  # transformers 4.x names
                  "stacked": "model.layers.0.mlp.experts.gate_up_proj"}[layout]
    assert expert_key in keys
    ours, cfg = load_model(run_a)
    hf = transformers.OlmoeForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel(ours(tokens(cfg)).logits, hf(tokens(cfg)).logits) < 1e-5
    text = "def main():\n    return 42"
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == tokenizer_for(cfg).encode(text)


# Published OLMoE checkpoints were written by transformers 4.x (one module per expert). The
# suite runs 4.x in a subprocess from its own --target directory, installed once into .cache/
# without dependencies (so nothing else changes), with those 5.x's do not bring: requests and its own.
TRANSFORMERS_4 = ["transformers==4.57.6", "tokenizers==0.22.1", "huggingface_hub==0.36.0", "requests==2.34.2",
                  "charset-normalizer==3.4.7", "urllib3==2.7.0", "certifi==2026.5.20", "idna==3.20"]

_TRANSFORMERS_4_SCRIPT = """
import sys, torch, transformers
assert transformers.__version__.startswith("4."), transformers.__version__
ours, fresh, out = sys.argv[1:4]
model = transformers.OlmoeForCausalLM.from_pretrained(ours).eval()
tok = transformers.AutoTokenizer.from_pretrained(ours)
ids = torch.load(out + ".in", weights_only=True)
torch.manual_seed(0)  # a 4.x model of the same sizes, saved the 4.x way
other = transformers.OlmoeForCausalLM(model.config).eval()
other.save_pretrained(fresh)
with torch.no_grad():
    torch.save({"ours": model(ids).logits, "fresh": other(ids).logits,
                "encoded": torch.tensor(tok(sys.argv[4], add_special_tokens=False)["input_ids"])}, out)
"""


@pytest.fixture(scope="module")
def transformers4():
    """PYTHONPATH entry holding transformers 4.x; pip-installed into .cache/ on first use."""
    return pip_target(TRANSFORMERS_4)


def test_transformers_4_loads_our_export_and_its_own_saves_import(run_a, tmp_path, transformers4):
    """Per-expert export → transformers 4.x: same logits and tokens; a 4.x save → megamoe: same logits."""
    ours, cfg = load_model(run_a)
    out = export_hf(run_a, tmp_path / "hf", expert_layout="per-expert", progress=False)
    ids = tokens(cfg)
    torch.save(ids, tmp_path / "result.pt.in")
    text = "def main():\n    return 42  # café"
    script = tmp_path / "t4.py"
    script.write_text(_TRANSFORMERS_4_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "fresh"),
                           str(tmp_path / "result.pt"), text], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(transformers4)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    with torch.no_grad():
        assert rel(ours(ids).logits, result["ours"]) < 1e-5
    assert result["encoded"].tolist() == tokenizer_for(cfg).encode(text)
    with safe_open(tmp_path / "fresh" / "model.safetensors", "pt") as f:
        assert "model.layers.0.mlp.experts.7.gate_proj.weight" in f.keys()  # the published layout
    back = tmp_path / "back"
    import_hf(tmp_path / "fresh", back, TINY, progress=False)
    model, _ = load_model(back)
    with torch.no_grad():
        assert rel(model(ids).logits, result["fresh"]) < 1e-5


def test_from_hf_round_trips_and_trains_in_another_layout(run_a, tmp_path):
    ours, cfg = load_model(run_a)
    for layout in ["per-expert", "stacked"]:
        hf_dir = export_hf(run_a, tmp_path / f"hf-{layout}", expert_layout=layout,
                           shard_bytes=100_000, progress=False)  # several shards
        back = tmp_path / f"back-{layout}"
        import_hf(hf_dir, back, TINY, progress=False)
        model, _ = load_model(back)
        meta = read_meta(resolve(back))
        assert meta["step"] == 0 and meta["optimizer"] is None
        with torch.no_grad():
            assert rel(model(tokens(cfg)).logits, ours(tokens(cfg)).logits) < 1e-6
    # unset, data.seq_length is the model's 32 positions, not the default 4096 it cannot run
    import_hf(hf_dir, tmp_path / "default-length", progress=False)
    assert load_config(str(tmp_path / "default-length" / "config.yaml")).data.seq_length == 32
    launch(back, 2, ["parallel.expert=2", "train.steps=1"])  # continue pretraining, EP2
    assert [r["step"] for r in metrics(back)] == [1]


def test_upcycled_dense_model_computes_the_dense_function_and_trains(tmp_path):
    """Every expert a copy of the FFN and normalized top-k weights: the MoE is the dense model."""
    dense_cfg = load_config(None, [*TINY, "moe.num_experts=0"])
    dense = dense_cfg.model.build(dense_cfg.moe)
    init_weights(dense, 0.2, seed=3)
    write_run(tmp_path / "dense", dense_cfg, ((n, p.detach()) for n, p in dense.named_parameters()))
    moe_run = tmp_path / "moe"
    upcycle(tmp_path / "dense", moe_run, num_experts=8, top_k=2, overrides=["moe.norm_topk_prob=true"],
            progress=False)
    moe, _ = load_model(moe_run)
    w = load_canonical(moe_run)[0]
    assert torch.equal(w["layers.1.ffn.experts.w1"][5], dict(dense.named_parameters())["layers.1.ffn.w1"])
    assert w["layers.1.ffn.router.weight"].shape == (8, 32)
    with torch.no_grad():
        assert rel(moe(tokens(dense_cfg)).logits, dense.eval()(tokens(dense_cfg)).logits) < 1e-5
    launch(moe_run, 1, ["moe.norm_topk_prob=true", "train.steps=1"])
    assert [r["step"] for r in metrics(moe_run)] == [1]
    # moe.dense_layers keep their FFN; transformers' OLMoE cannot express such a model
    mixed_run = tmp_path / "mixed"
    upcycle(tmp_path / "dense", mixed_run, num_experts=8, top_k=2, progress=False,
            overrides=["moe.norm_topk_prob=true", "moe.dense_layers=[0]"])
    mixed, _ = load_model(mixed_run)
    w = load_canonical(mixed_run)[0]
    assert torch.equal(w["layers.0.ffn.w1"], dict(dense.named_parameters())["layers.0.ffn.w1"])
    assert "layers.1.ffn.experts.w1" in w and "layers.0.ffn.router.weight" not in w
    with torch.no_grad():
        assert rel(mixed(tokens(dense_cfg)).logits, dense(tokens(dense_cfg)).logits) < 1e-5
    with pytest.raises(CheckpointError, match="dense layers"):
        export_hf(mixed_run, tmp_path / "hf", progress=False)
    # an override that changes a shape of the source names the fix, and writes nothing
    with pytest.raises(CheckpointError, match=r"does not fit the model the config describes \(\[512, 16\]\): a "
                                              r"model\.\* or moe\.\* setting given differs from the source's; drop"):
        upcycle(tmp_path / "dense", tmp_path / "wide", num_experts=8, top_k=2, progress=False,
                overrides=["model.d_model=16"])
    assert not (tmp_path / "wide").exists()


# Bad input: one clear error each ----------------------------------------------------------

def test_corrupt_truncated_or_missing_files_are_named(run_a, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(run_a / "checkpoints" / "step_00000006", ckpt)
    victim = ckpt / "model-rank00001.safetensors"
    good = victim.read_bytes()
    victim.write_bytes(good[:-64])  # truncated
    with pytest.raises(CheckpointError, match="model-rank00001.safetensors.*(corrupt|truncated)"):
        export_hf(ckpt, tmp_path / "hf", progress=False)
    victim.write_bytes(good[:-8] + b"\0" * 8)  # same size, different bytes
    with pytest.raises(CheckpointError, match="model-rank00001.safetensors is corrupt"):
        load_canonical(ckpt)
    victim.unlink()
    with pytest.raises(CheckpointError, match="model-rank00001.safetensors is missing"):
        load_canonical(ckpt)
    assert not (tmp_path / "hf").exists()  # nothing half-written


def test_hf_missing_shard_and_mismatched_config_are_refused(run_a, tmp_path):
    hf_dir = export_hf(run_a, tmp_path / "hf", shard_bytes=100_000, progress=False)
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(dict(config, intermediate_size=64)))
    with pytest.raises(CheckpointError, match="does not fit"):
        import_hf(hf_dir, tmp_path / "bad", TINY, progress=False)
    (hf_dir / "config.json").write_text(json.dumps(config))
    shard = sorted(set(json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"].values()))[1]
    (hf_dir / shard).unlink()
    with pytest.raises(CheckpointError, match=f"{shard}.*missing"):
        import_hf(hf_dir, tmp_path / "bad", TINY, progress=False)
    assert not (tmp_path / "bad").exists()


def test_layout_that_does_not_divide_and_existing_outputs_are_refused(run_a, tmp_path):
    with pytest.raises(ConfigError, match="parallel.expert"):
        reshard(run_a, tmp_path / "r", ["parallel.expert=3"], world_size=3, progress=False)
    with pytest.raises(ConfigError, match="parallel.tensor"):
        reshard(run_a, tmp_path / "r", ["parallel.tensor=3"], world_size=3, progress=False)
    with pytest.raises(CheckpointError, match="parallel layout only"):
        reshard(run_a, tmp_path / "r", ["model.d_model=64"], world_size=1, progress=False)
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="--overwrite"):
        export_hf(run_a, out, progress=False)
    assert (out / "mine.txt").read_text() == "keep"
    export_hf(run_a, out, overwrite=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "mine.txt").exists()


def test_safetensors_files_get_the_permissions_of_every_other_file(run_a, tmp_path):
    out = export_hf(run_a, tmp_path / "hf", progress=False)
    files = [*run_a.rglob("*.safetensors"), *out.glob("*.safetensors")]
    mode = {f: os.stat(f).st_mode & 0o777 for f in files}
    assert len(files) > 2 and set(mode.values()) == {os.stat(out / "config.json").st_mode & 0o777}, mode


def test_cli_inspect_and_errors(run_a, tmp_path):
    tool = [sys.executable, "-m", "megamoe.cli.convert"]
    shown = subprocess.run([*tool, "inspect", str(run_a), "--verify"], capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    for text in (r"step +6", "tp 1 · pp 1 · ep 2 · dp 2 · zero 1", "sha256 verified",
                 r"layers\.1\.ffn\.experts\.w1 +\[8, 32, 64\] +F32 +2", "vocab_size: 512"):
        assert re.search(text, shown.stdout), text
    failed = subprocess.run([*tool, "to-hf", str(tmp_path / "nothing"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and f"{tmp_path / 'nothing'} does not exist; give a run directory" in failed.stderr
    (tmp_path / "empty").mkdir()
    failed = subprocess.run([*tool, "to-hf", str(tmp_path / "empty"), str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert failed.returncode == 2 and "is neither a megamoe run directory" in failed.stderr
    pruned = run_a / "checkpoints" / "step_00000001"  # a step keep_checkpoints removed: those there named
    failed = subprocess.run([*tool, "to-hf", str(pruned), str(tmp_path / "out")], capture_output=True, text=True)
    there = ", ".join(sorted(p.name for p in (run_a / "checkpoints").glob("step_*")))
    assert failed.returncode == 2 and f"{pruned} does not exist (beside it: {there})" in failed.stderr


def test_from_hf_cli_takes_a_config_file_for_everything_but_the_model(run_a, tmp_path):
    """`from-hf --config sft.yaml key=value`: the YAML, then the overrides, set the new run's
    training keys; model sizes always come from config.json, whatever the YAML says."""
    hf_dir = export_hf(run_a, tmp_path / "hf", progress=False)
    (tmp_path / "sft.yaml").write_text("model:\n  d_model: 4096\noptim:\n  lr: 2.0e-5\n  weight_decay: 0.0\n"
                                       "train:\n  steps: 7\n  global_batch_size: 8\n  micro_batch_size: 2\n"
                                       "data:\n  seq_length: 16\n")
    out = tmp_path / "sft-run"
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli.convert", "from-hf",
                           "--no-progress", "--config", str(tmp_path / "sft.yaml"), str(hf_dir), str(out),
                           "train.steps=9"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(str(out / "config.yaml"))
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.train.steps) == (2e-5, 0.0, 9)
    assert cfg.model.d_model == 32 and cfg.moe.num_experts == 8  # from config.json, not the YAML
    ours, ours_cfg = load_model(run_a)
    model, _ = load_model(out)
    with torch.no_grad():
        assert rel(model(tokens(ours_cfg)).logits, ours(tokens(ours_cfg)).logits) < 1e-6
