"""The trainer end to end: runs, resumes bit-exactly, refuses bad runs, and DP equals 1 rank."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from megamoe.checkpoint.files import CheckpointError
from megamoe.checkpoint.hf_dirs import export_hf
from megamoe.checkpoint.io import latest_checkpoint
from megamoe.config import load_config
from megamoe.model.flops import flops_per_token
from megamoe.model.olmoe import init_weights
from runs import REPO, TINY, assert_same_run, final_weights, free_port, launch, metrics


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The 1-rank run every layout is compared with (gradient accumulation 4)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    launch(run, 1, ["train.save_interval=2"])
    return run


def test_run_dir_holds_config_metrics_events_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    out = launch(run, 1, ["run.tensorboard=true", "train.steps=2"]).stdout
    assert f"{run} holds config.yaml, metrics.jsonl, tensorboard/ and checkpoints/" in out  # the closing line
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps"] == 2
    records = metrics(run)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "lm_loss", "lb_loss", "z_loss", "lr", "grad_norm", "tokens_per_sec", "expert_load"):
        assert key in records[0], key
    cfg = load_config(None, [*TINY, "train.steps=2"])
    assert records[0]["tflops_per_rank"] == pytest.approx(
        records[0]["tokens_per_sec"] * flops_per_token(cfg, 16) / 1e12, rel=1e-6)
    assert "mfu" not in records[0]  # no known peak on a CPU
    assert len(records[0]["expert_load"]) == 2 and len(records[0]["expert_load"][0]) == 8
    assert sum(records[0]["expert_load"][0]) == pytest.approx(1.0)
    assert records[0]["loss"] == pytest.approx(records[0]["lm_loss"] + 0.01 * 2 * records[0]["lb_loss"]
                                               + 0.001 * 2 * records[0]["z_loss"], rel=1e-4)
    assert list((run / "tensorboard").glob("events.out.tfevents*"))
    assert latest_checkpoint(run / "checkpoints").name == "step_00000002"


def test_routing_is_seen_per_step_and_as_a_heatmap_each_eval(tmp_path):
    """Capacity routing with aux-loss-free biases: every step logs each MoE layer's max/mean load,
    coefficient of variation, dropped share and bias spread; each eval, a load heatmap image."""
    run = tmp_path / "run"
    proc = launch(run, 1, ["run.tensorboard=true", "train.steps=2", "train.eval_interval=2",
                           "moe.capacity_factor=1.0", "moe.bias_update_rate=0.01"])
    first, last = metrics(run)
    share = torch.tensor(first["expert_load"])  # [2 layers, 8 experts]
    assert first["load_max_over_mean"] == pytest.approx((share.max(-1).values * 8).tolist())
    assert first["load_cv"] == pytest.approx((share.std(-1, correction=0) * 8).tolist())
    assert len(first["dropped_fraction"]) == 2 and 0 < max(first["dropped_fraction"]) < 1
    assert first["bias_spread"] == pytest.approx([0.02, 0.02])  # rate × (+1 − (−1)) after one step
    assert "max/mean" in proc.stdout and "dropped" in proc.stdout and "bias spread" in proc.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    assert "experts/load_cv_layer1" in events.Tags()["scalars"]
    heatmaps = events.Images("experts/load_heatmap")
    assert [h.step for h in heatmaps] == [2] and (heatmaps[0].height, heatmaps[0].width) == (16, 64)


def test_loss_falls(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=12", "optim.warmup_steps=2", "train.global_batch_size=4"])
    losses = [r["lm_loss"] for r in metrics(run)]
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("nproc,extra", [(1, []), (2, ["parallel.zero_stage=1"]),
                                         (1, ["optim.offload=cpu", "train.precision=bf16"])])
def test_resume_continues_bit_exactly(tmp_path, reference, nproc, extra):
    """Stop after step 2, resume from its checkpoint: steps 3-4 and the weights are identical."""
    straight = tmp_path / "straight"
    launch(straight, nproc, ["train.save_interval=2", *extra])
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    (resumed / "metrics.jsonl").write_text("")
    launch(resumed, nproc, ["train.save_interval=2", *extra])
    after = {r["step"]: r for r in metrics(resumed)}
    assert sorted(after) == [3, 4]
    for r in metrics(straight)[2:]:
        assert after[r["step"]]["loss"] == r["loss"] and after[r["step"]]["grad_norm"] == r["grad_norm"]
    a, b = final_weights(resumed), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_expert_bias_is_saved_and_resumes_in_another_layout(tmp_path):
    """Aux-loss-free balancing: the routers' biases are checkpointed under canonical names, and a
    1-rank run stopped at step 2 and resumed at EP2 continues the 1-rank curve, biases included."""
    aux_free = ["moe.bias_update_rate=0.01", "train.save_interval=2"]
    straight = tmp_path / "straight"
    launch(straight, 1, aux_free)
    bias = final_weights(straight)["layers.1.ffn.router.expert_bias"]
    assert bias.abs().max() > 0 and torch.allclose(bias / 0.01, (bias / 0.01).round(), atol=1e-4)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    (resumed / "metrics.jsonl").write_text("")
    launch(resumed, 2, [*aux_free, "parallel.expert=2"])
    for r, ref in zip(metrics(resumed), metrics(straight)[2:]):
        assert r["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    a, b = final_weights(resumed), final_weights(straight)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(CheckpointError, match="--drop-expert-bias"):
        export_hf(straight, tmp_path / "hf", progress=False)
    out = export_hf(straight, tmp_path / "hf", progress=False, drop_expert_bias=True)
    keys = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.layers.1.mlp.gate.weight" in keys and not any("bias" in k for k in keys)


@pytest.mark.parametrize("zero", [0, 1, 2])
def test_data_parallel_equals_one_rank(tmp_path, reference, zero):
    run = tmp_path / "dp2"
    out = launch(run, 2, [f"parallel.zero_stage={zero}", "train.save_interval=2"]).stdout
    assert_same_run(run, reference)
    assert "partitions the optimizer" not in out  # two data-parallel ranks: DeepSpeed's ZeRO as asked
    # one closing line (rank 0's); DeepSpeed's per-rank "op built successfully" is not shown
    assert out.count("megamoe: done: step 4 of 4 in ") == 1 and f"{run} holds config.yaml" in out
    assert "built successfully" not in out


def test_profiled_steps_are_traced_on_the_ranks_asked_and_train_as_unprofiled(tmp_path, reference):
    """train.profile_steps [2, 3] on rank 1 of 2: that rank writes a trace holding steps 2 and 3 (no other
    step's range) and a table of operators; rank 0 writes nothing; the run equals the 1-rank reference.
    A resumed run whose window lies before the resume point says nothing is profiled."""
    run = tmp_path / "dp2"
    out = launch(run, 2, ["train.profile_steps=[2, 3]", "train.profile_ranks=[1]", "train.save_interval=2"]).stdout
    assert_same_run(run, reference)
    folder = run / "profile" / "steps2-3"
    assert f"megamoe: rank 1: profile of steps 2-3 in {folder}" in out
    assert sorted(p.name for p in folder.iterdir()) == ["rank1.trace.json", "rank1.txt"]
    events = json.loads((folder / "rank1.trace.json").read_text())["traceEvents"]
    steps = {e["name"] for e in events if e.get("name", "").startswith("megamoe step ")}
    assert steps == {"megamoe step 2", "megamoe step 3"}
    assert any(e.get("name") == "aten::mm" for e in events)  # the operators inside them
    # the window holds step 2's save (train.save_interval=2), named as such
    assert any(e.get("name") == "megamoe save" for e in events)
    assert not any(e.get("name") == "megamoe eval" for e in events)  # the run's one eval is at step 4
    table = (folder / "rank1.txt").read_text()
    assert table.startswith("megamoe profile: steps 2-3 (2 steps), rank 1, cpu") and "aten::mm" in table
    # each step's time split into its phases (summed over its micro-batches), which add up to the step's; the
    # step before the window is timed too, unprofiled
    phases = re.findall(r"^step (\d+)(?: \(before the window, not profiled\))?: ([\d.]+) ms: forward ([\d.]+), "
                        r"backward ([\d.]+), optimizer ([\d.]+), the rest ([\d.]+)$", table, re.M)
    assert [p[0] for p in phases] == ["1", "2", "3"], table[:600]
    assert "step 1 (before the window, not profiled): " in table
    for _, total, *parts in phases:
        assert all(float(x) > 0 for x in parts) and abs(sum(map(float, parts)) - float(total)) < 0.05
    again = launch(run, 1, ["train.steps=5", "train.profile_steps=[3, 5]"]).stdout
    assert "train.profile_steps=[3, 5] starts at or before the resume point (step 4); nothing is profiled" in again
    assert not (run / "profile" / "steps3-5").exists()


def test_a_new_run_starts_from_another_runs_weights_in_another_layout(tmp_path, reference):
    """train.init_from: a TP2 run with another seed starts from the reference's final weights (lr 1e-30 leaves
    them as they are to the bit) with fresh Adam moments (after one step exp_avg_sq = 5·exp_avg², as
    (1-β2)g² and (1-β1)g are; moments carried over would break it) at step 0; a relaunch resumes its own
    checkpoint instead."""
    from megamoe.checkpoint.files import ShardedReader, read_meta
    run = tmp_path / "init"
    source = reference / "checkpoints" / "step_00000004"
    changes = [f"train.init_from={reference}", "parallel.tensor=2", "train.steps=1", "optim.lr=1e-30",
               "optim.warmup_steps=0", "train.seed=7"]
    out = launch(run, 2, changes).stdout
    assert f"megamoe: weights from {source} (step 4 of that run); optimizer state, step count and data" in out
    mine, ref = final_weights(run), final_weights(reference)
    assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)
    step_dir = latest_checkpoint(run / "checkpoints")
    assert step_dir.name == "step_00000001" and read_meta(step_dir)["optimizer"]["step"] == 1
    with ShardedReader(step_dir, read_meta(step_dir), "optim") as r:
        for name in ("layers.0.attn.q_proj.weight", "layers.1.ffn.experts.w1"):
            m, v = r.read(f"{name}.exp_avg"), r.read(f"{name}.exp_avg_sq")
            torch.testing.assert_close(v, 5 * m * m, rtol=1e-4, atol=1e-20)
    again = launch(run, 1, [c for c in changes if c != "parallel.tensor=2"] + ["train.steps=2"]).stdout
    assert "resuming at step 1" in again and "weights from" not in again


@pytest.mark.parametrize("override,message", [
    ("model.d_model=64", "holds a model with model.d_model=32, this run's has 64; set model.d_model as that "
                         "model has"),
    ("moe.num_experts=4", "holds a model with moe.num_experts=8, this run's has 4"),
    ("moe.dense_layers=[0]", "holds a model with moe.dense_layers=[], this run's has [0]"),
])
def test_a_checkpoint_that_cannot_start_this_model_is_refused_before_the_run_dir_is_made(tmp_path, reference,
                                                                                       override, message):
    run = tmp_path / "init"
    proc = launch(run, 1, [f"train.init_from={reference}", override], check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"megamoe: error: train.init_from: {reference / 'checkpoints' / 'step_00000004'} {message}" in proc.stderr
    assert not run.exists()
    proc = launch(run, 1, [f"train.init_from={tmp_path / 'nowhere'}"], check=False)
    assert proc.returncode == 2 and "megamoe: error: train.init_from: " in proc.stderr
    assert f"{tmp_path / 'nowhere'} does not exist; give a run directory" in proc.stderr and not run.exists()


def test_init_from_compares_shapes_not_how_keys_are_written(tmp_path, reference):
    """model.head_dim=8 is the default's 32 / 4: the same tensors, so the run starts; a relaunch once the run
    has saved resumes it even where init_from no longer points at a checkpoint."""
    run = tmp_path / "init"
    out = launch(run, 1, [f"train.init_from={reference}", "model.head_dim=8", "train.steps=1"]).stdout
    assert "megamoe: weights from" in out
    again = launch(run, 1, [f"train.init_from={tmp_path / 'gone'}", "model.head_dim=8", "train.steps=2"]).stdout
    assert "resuming at step 1" in again and "weights from" not in again


def test_zero_on_one_data_parallel_rank_runs_megamoes_optimizer(tmp_path, reference):
    """ZeRO partitions over data-parallel ranks; over one it saves nothing (the presets' zero_stage 1
    on one GPU): the run says so and updates with megamoe's AdamW, the reference's to the bit (losses,
    gradient norms, weights); config.yaml keeps the stage asked for, for a relaunch on more ranks."""
    run = tmp_path / "zero1"
    out = launch(run, 1, ["parallel.zero_stage=1", "train.save_interval=2"]).stdout
    assert "parallel.zero_stage=1 partitions the optimizer over data-parallel ranks and this run has one" in out
    for a, b in zip(metrics(run), metrics(reference), strict=True):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"]), a["step"]
    mine, ref = final_weights(run), final_weights(reference)
    assert all(torch.equal(mine[k], ref[k]) for k in ref)
    assert yaml.safe_load((run / "config.yaml").read_text())["parallel"]["zero_stage"] == 1


def test_a_model_that_cannot_fit_is_refused_before_anything_starts(tmp_path):
    """Without --config the defaults are OLMoE-1B-7B: on a CPU its fp32 weights, gradients and AdamW
    state need ~103 GiB, and the kernel killed such a run without a word. A model past the host's
    memory (here 2,048 layers, terabytes) ends in one line naming the size and the fixes, exit 2,
    with no run directory made."""
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "megamoe.train", "model.n_layers=2048", f"run.dir={run}"],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megamoe: error: model: ") and "--config tiny-cpu" in lines[0]
    assert not run.exists()


def test_running_out_of_gpu_memory_is_one_line_naming_the_fixes(tmp_path, monkeypatch, capsys):
    """torch's OutOfMemoryError mid-run (activations past what the start-up check counts) ends the
    run with one line: torch's first sentence, and what to lower or turn on."""
    import megamoe.train.loop as loop
    from megamoe.train.__main__ import main

    class Trainer:
        def __init__(self, cfg, lock):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 79.19 GiB of which 1.20 GiB is free.")
    monkeypatch.setattr(loop, "Trainer", Trainer)
    assert main([*TINY, f"run.dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("megamoe: error: CUDA out of memory (GPU memory ran out")
    assert "train.micro_batch_size" in err[0] and "activation_checkpointing" in err[0]


def test_a_missing_eval_task_file_is_refused_before_the_run_dir_is_made(tmp_path):
    run = tmp_path / "run"
    proc = launch(run, 1, [f"train.eval_tasks=[{tmp_path}/none.jsonl]"], check=False)
    assert proc.returncode == 2 and "megamoe: error: train.eval_tasks: task file" in proc.stderr
    assert not run.exists()


def test_the_memory_check_counts_ranks_precision_and_offload():
    """check_memory against a given memory size: the 1-rank OLMoE-1B-7B needs 16 bytes a parameter
    (103.1 GiB), on the CPU for every local rank, on a GPU per card, where optim.offload=cpu leaves
    the bf16 weights and gradients only (4 bytes a parameter)."""
    from megamoe.config import ConfigError
    from megamoe.train.engine import check_memory
    cfg = load_config(None, ["parallel.expert=1"])
    need = 16 * sum(cfg.model.param_counts(cfg.moe).values())
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    check_memory(cfg, 1, 1, cpu, available=need * 1.01)
    with pytest.raises(ConfigError, match=r"need 103\.1 GiB of this host's memory .*[(]one rank"):
        check_memory(cfg, 1, 1, cpu, available=need * 0.99)
    two = load_config(None, ["parallel.tensor=2"])  # each of two local ranks holds about half
    with pytest.raises(ConfigError, match="2 ranks × "):
        check_memory(two, 2, 2, cpu, available=need * 0.99)
    check_memory(cfg, 1, 1, gpu, available=need * 1.01)
    with pytest.raises(ConfigError, match=r"on each GPU .*optim.offload=cpu"):
        check_memory(cfg, 1, 1, gpu, available=need * 0.99)
    offload = load_config(None, ["parallel.expert=1", "optim.offload=cpu"])
    check_memory(offload, 1, 1, gpu, available=need / 4 * 1.01)
    with pytest.raises(ConfigError):
        check_memory(offload, 1, 1, gpu, available=need / 4 * 0.99)
    # FP8 experts over 8 micro-batches a step keep their weights quantized: 2 bytes an expert parameter more,
    # and a card that holds the rest but not that is told to turn the cache off
    fp8 = load_config(None, ["parallel.expert=1", "moe.expert_precision=fp8"])
    assert fp8.grad_accumulation_steps(1) == 8
    cache = 2 * cfg.model.param_counts(cfg.moe)["experts"]
    check_memory(fp8, 1, 1, gpu, available=(need + cache) * 1.01)
    with pytest.raises(ConfigError, match=r"^train.fp8_weight_cache: .* GiB of it\), .*train.fp8_weight_cache=false"):
        check_memory(fp8, 1, 1, gpu, available=need * 1.01)
    for fits in (["train.fp8_weight_cache=false"], ["train.global_batch_size=1"]):  # no cache kept
        check_memory(load_config(None, ["parallel.expert=1", "moe.expert_precision=fp8", *fits]), 1, 1, gpu,
                     available=need * 1.01)
    with pytest.raises(ConfigError, match="this host's memory"):  # on the CPU the cache is host memory
        check_memory(fp8, 1, 1, cpu, available=need * 1.01)


def test_fp8_experts_are_refused_on_a_gpu_before_hopper():
    """FP8 experts on a GPU without the FP8 tensor cores megamoe's products use (before sm_90, e.g. an A100)
    are refused with the key and the fix, before anything is set up; Hopper and later, the CPU (the
    reference path, which the tests run) and bf16 experts anywhere pass."""
    from megamoe.config import ConfigError
    from megamoe.train.engine import check_fp8_device
    fp8, bf16 = load_config(None, ["moe.expert_precision=fp8"]), load_config(None, [])
    gpu = torch.device("cuda", 0)
    with pytest.raises(ConfigError, match=r"^moe.expert_precision: fp8 needs .* is sm_80, .* set moe.expert_precision=model"):
        check_fp8_device(fp8, gpu, capability=(8, 0))
    with pytest.raises(ConfigError, match="sm_89"):  # Ada converts to e4m3, but megamoe's kernels are Hopper's
        check_fp8_device(fp8, gpu, capability=(8, 9))
    for cfg, device, capability in ((fp8, gpu, (9, 0)), (fp8, gpu, (10, 0)), (fp8, torch.device("cpu"), (8, 0)),
                                    (bf16, gpu, (8, 0))):
        check_fp8_device(cfg, device, capability=capability)
    attention = load_config(None, ["model.attention_precision=fp8"])  # the FP8 projections: the same rule
    with pytest.raises(ConfigError,
                       match=r"^model.attention_precision: fp8 needs .* set model.attention_precision=model"):
        check_fp8_device(attention, gpu, capability=(8, 0))
    check_fp8_device(attention, gpu, capability=(9, 0))


def test_changed_model_cannot_resume(tmp_path):
    """A changed model is refused (the fix: another run.dir); a changed batch too, with train.init_from named;
    more steps continue the run; fewer than it has are refused before config.yaml changes; a finished run
    says so."""
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=1"])
    proc = launch(run, 1, ["train.steps=2", "model.d_model=64"], check=False)
    assert proc.returncode == 2
    assert "model.d_model" in proc.stderr and "start a new run with another run.dir." in proc.stderr
    proc = launch(run, 1, ["train.steps=2", "train.global_batch_size=4"], check=False)
    assert proc.returncode == 2 and f"another run.dir with train.init_from={run}." in proc.stderr
    # but more steps may be asked of the same run: it resumes at step 1
    launch(run, 1, ["train.steps=2"])
    assert [r["step"] for r in metrics(run)] == [1, 2]
    config = (run / "config.yaml").read_text()
    proc = launch(run, 1, ["train.steps=1"], check=False)
    assert proc.returncode == 2 and proc.stderr.strip().endswith(
        f"megamoe: error: train.steps: the run in {run} is at step 2 already, past train.steps=1; give "
        "train.steps above 2 to continue it, or another run.dir (with train.init_from to start from its weights)")
    assert (run / "config.yaml").read_text() == config
    out = launch(run, 1, ["train.steps=2"]).stdout
    assert "megamoe: the run is finished (step 2 of train.steps=2): nothing to train; give train.steps above 2" in out
    assert [r["step"] for r in metrics(run)] == [1, 2]


def test_a_run_saved_before_a_config_key_existed_resumes_at_its_default():
    """A checkpoint's config from before a key was added (here `model.attention_precision`) lacks it: that run
    ran with the default, so a launch with the default continues it, and one asking for another value is
    refused with the key named."""
    from megamoe.config import ConfigError
    from megamoe.train.rundir import check_resumable
    cfg = load_config(None, [])
    saved = cfg.to_dict()
    del saved["model"]["attention_precision"]
    check_resumable(saved, cfg, Path("ckpt"))
    with pytest.raises(ConfigError, match=r"^model.attention_precision: the run in ckpt used 'model', "
                                          r"this launch asks for 'fp8'"):
        check_resumable(saved, load_config(None, ["model.attention_precision=fp8"]), Path("ckpt"))
    with pytest.raises(ConfigError, match=r"^model.d_model:"):  # a key it has still counts as saved
        check_resumable(saved, load_config(None, ["model.d_model=64"]), Path("ckpt"))


@pytest.mark.parametrize("override", ["train.gc_interval=0", "train.fp8_weight_cache=false",
                                      "train.profile_steps=[2, 3]", "train.profile_ranks=[1]", "train.compile=true"])
def test_keys_that_change_no_result_may_change_on_resume(override):
    """Garbage collection's cadence, the FP8 weights' cache (the same values), the profiler and compilation
    change how a step runs, not what it computes: a run continues with another value."""
    from megamoe.train.rundir import check_resumable
    check_resumable(load_config(None, []).to_dict(), load_config(None, [override]), Path("ckpt"))


def test_foreign_run_dir_is_not_overwritten(tmp_path):
    run = tmp_path / "precious"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    proc = launch(run, 1, [], check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert (run / "notes.txt").read_text() == "mine" and len(list(run.iterdir())) == 1


def test_layout_that_does_not_divide_is_refused_before_training(tmp_path):
    proc = launch(tmp_path / "run", 2, ["train.global_batch_size=6", "train.micro_batch_size=4"], check=False)
    assert proc.returncode != 0 and "train.global_batch_size" in proc.stderr


def test_corrupt_checkpoint_is_named(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=1"])
    ckpt = latest_checkpoint(run / "checkpoints")
    model_file = next(ckpt.glob("model-rank*.safetensors"))
    model_file.write_bytes(model_file.read_bytes()[:-100])
    proc = launch(run, 1, ["train.steps=2"], check=False)
    assert proc.returncode == 2 and model_file.name in proc.stderr and "corrupt" in proc.stderr


def test_generate_tool_samples_greedily_from_the_checkpoint(reference):
    """megamoe-generate with temperature 0 continues the prompt with the model's argmax tokens."""
    import subprocess
    import sys

    from megamoe.inference.load import load_model, tokenizer_for
    model, cfg = load_model(reference)
    tok = tokenizer_for(cfg)
    ids = tok.encode("def ")
    for _ in range(5):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    expected = tok.decode(ids)
    out = subprocess.run([sys.executable, "-m", "megamoe.cli.generate", str(reference), "--prompt", "def ",
                          "--max-new-tokens", "5", "--temperature", "0"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.rstrip("\n") == expected


def test_sampling_keeps_to_the_tokenizers_vocabulary():
    """A model's vocabulary may be padded past its tokenizer's (OLMoE's 50,304 rows with a 32,000-piece
    tokenizer): generation samples only real pieces, greedily and at random, even where the padding
    rows score highest (here they are made to); decoding a padding id is an error."""
    from megamoe.inference.generate import generate
    from megamoe.inference.load import tokenizer_for
    cfg = load_config(None, [*TINY])
    tok = tokenizer_for(cfg)
    cfg.model.vocab_size = tok.vocab_size + 64
    model = cfg.model.build(cfg.moe)
    init_weights(model, cfg.model.init_std, seed=0)
    with torch.no_grad():
        model.lm_head.weight[tok.vocab_size:] *= 1000  # the padding rows win every argmax
    with pytest.raises(Exception):
        tok.decode([tok.vocab_size])
    for temperature in (0.0, 0.8):
        text = generate(model, tok, "def ", max_new_tokens=8, temperature=temperature, top_k=80)
        assert tok.decode(tok.encode(text)) == text


def test_offloaded_optimizer_follows_the_in_place_one(tmp_path, reference):
    """optim.offload=cpu (Adam state in host memory, updated there) on 2 data-parallel ranks
    follows the 1-rank run with the optimizer in place."""
    run = tmp_path / "offload"
    launch(run, 2, ["optim.offload=cpu", "train.save_interval=2"])
    assert_same_run(run, reference)


def test_bf16_matches_fp32_across_layouts_and_resumes_exactly(tmp_path, reference):
    """bf16 (DeepSpeed's ZeRO optimizer, fp32 masters): 1 rank, EP2 and PP2 follow the fp32 run
    within bf16 rounding, and a resumed bf16 run continues bit-exactly. PP2 profiles step 3 on its
    first stage: the 1F1B schedule is one phase there (its forwards and backwards interleave)."""
    runs = {}
    for name, nproc, extra in [("one", 1, []), ("ep2", 2, ["parallel.expert=2"]),
                               ("pp2", 2, ["parallel.pipeline=2", "train.profile_steps=[3, 3]"])]:
        runs[name] = tmp_path / name
        launch(runs[name], nproc, ["train.precision=bf16", "train.save_interval=2", *extra])
    header = (runs["pp2"] / "profile" / "steps3-3" / "rank0.txt").read_text()
    assert re.search(r"^step 3: [\d.]+ ms: 1F1B schedule \(forward, backward, optimizer\) [\d.]+, the rest [\d.]+$",
                     header, re.M), header[:500]
    ref = metrics(reference)
    for run in runs.values():
        for got, want in zip(metrics(run), ref):
            assert got["loss"] == pytest.approx(want["loss"], rel=2e-3)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=3e-2)
    resumed = tmp_path / "resumed"
    shutil.copytree(runs["one"], resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000004")
    (resumed / "checkpoints" / "latest").write_text("step_00000002\n")
    (resumed / "metrics.jsonl").write_text("")
    launch(resumed, 1, ["train.precision=bf16", "train.save_interval=2"])
    assert [r["loss"] for r in metrics(resumed)] == [r["loss"] for r in metrics(runs["one"])[2:]]


def test_entry_point_leaves_no_process_group_behind(tmp_path):
    """`main` destroys its process groups before returning, on every rank: left to interpreter
    finalization, gloo's worker threads can abort a run that finished (SIGABRT). The script then
    ends as the `megamoe-train` command does (`_exit`, no finalization): the threads DeepSpeed and
    the parallel state keep alive past destroy_process_group can still abort a finalizing
    interpreter now and then (`__main__._exit`), which is not what this test is about."""
    script = tmp_path / "entry.py"
    script.write_text(
        "import sys\n"
        "import torch.distributed as dist\n"
        "from megamoe.train.__main__ import _exit, main\n"
        "code = main(sys.argv[1:])\n"
        "print(f'exit={code} group_left={dist.is_initialized()}', flush=True)\n"
        "_exit(code)\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={free_port()}", str(script), *TINY, "train.steps=1",
           f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("exit=0 group_left=False") == 2, proc.stdout[-2000:]


SIGNAL_AT = """
import os, signal, sys
import megamoe.train.loop as loop
from megamoe.train.__main__ import main
at, launch = int(sys.argv[1]), loop.Trainer._launch_step
def signalled(self, preempt=None):
    if self.step + 1 == at:  # SIGUSR1 while this step is being queued (the flag goes with its statistics)
        os.kill(os.getpid(), signal.SIGUSR1)
    return launch(self, preempt)
loop.Trainer._launch_step = signalled
sys.exit(main(sys.argv[2:]))
"""


def test_a_stop_read_with_a_step_finishes_the_step_queued_after_it_and_resumes_exactly(tmp_path):
    """Preemption with the overlapped read: the signal reaches the trainer with step 3, which is read
    after step 4 is queued; step 4 is finished and logged, its checkpoint written (not a save step),
    the run exits 75, and its continuation equals the uninterrupted run's metrics and weights, bit
    for bit."""
    script = tmp_path / "signal_at.py"
    script.write_text(SIGNAL_AT)
    run, straight = tmp_path / "run", tmp_path / "straight"
    steps = ["train.steps=6", "train.save_interval=5"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(script), "3", *TINY, *steps, f"run.dir={run}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert "preempted by SIGUSR1; checkpoint at step 4 saved" in proc.stdout
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert latest_checkpoint(run / "checkpoints").name == "step_00000004"
    assert "resuming at step 4" in launch(run, 1, steps).stdout
    launch(straight, 1, steps)
    got, want = metrics(run), metrics(straight)
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4, 5, 6]
    for r, w in zip(got, want):
        assert r["loss"] == w["loss"] and r["grad_norm"] == w["grad_norm"], r["step"]
    a, b = final_weights(run), final_weights(straight)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_each_step_logs_its_own_time_when_read_after_the_next_is_queued(tmp_path):
    """tokens_per_sec per step with the overlapped read: on the CPU a step's work is done while it is
    queued, so a step read right after the one before it (here 3 and 6: they evaluate) must still be
    given its own time, not the moment between the two reads."""
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=6", "train.eval_interval=3"])
    rates = {r["step"]: r["tokens_per_sec"] for r in metrics(run)}
    typical = sorted(rates[s] for s in range(2, 7))[2]
    assert all(typical / 5 < rates[s] < typical * 5 for s in range(2, 7)), rates


FP8_CACHE = """
import sys
from pathlib import Path
import megamoe.train.loop as loop
from megamoe.moe.experts import SwiGLUExperts
from megamoe.train.__main__ import main
caches, uses = [], []
real_cache, real_weights = loop.cache_fp8_weights, SwiGLUExperts._fp8_weights
def cache(model):
    caches.append(1)
    return real_cache(model)
def weights(self):  # each FP8 experts forward: did it read cached forms?
    uses.append(self.fp8_cache_valid)
    return real_weights(self)
loop.cache_fp8_weights, SwiGLUExperts._fp8_weights = cache, weights
rc = main(sys.argv[1:])
print(f"fp8 caches {len(caches)} cached forwards {sum(uses)} per call {len(uses) - sum(uses)}")
sys.exit(rc)
"""


def test_fp8_weights_quantized_once_a_step_train_as_quantized_each_forward(tmp_path):
    """FP8 experts with 4 micro-batches a step: the trainer quantizes the weights once a step
    (`cache_fp8_weights`) for its 4 forwards and backwards, and the run is the run that quantizes them
    in every forward and backward (`train.fp8_weight_cache=false`): losses, gradient norms, eval loss
    and final weights bit for bit.
    The evaluation after the last step reads no cached forms (they stood for the weights before the
    step's update)."""
    script = tmp_path / "fp8_cache.py"
    script.write_text(FP8_CACHE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    runs = {}
    for mode in ("on", "off"):
        runs[mode] = tmp_path / mode
        proc = subprocess.run([sys.executable, str(script), *TINY, "moe.expert_precision=fp8", "train.eval_interval=4",
                               f"train.fp8_weight_cache={mode == 'on'}", f"run.dir={runs[mode]}"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = proc.stdout.strip().splitlines()[-1]
        # 4 steps × 4 micro-batches × 2 layers cached; the eval's 1 batch × 4 micro-batches × 2 layers not
        assert counts == ("fp8 caches 4 cached forwards 32 per call 8" if mode == "on" else
                          "fp8 caches 0 cached forwards 0 per call 40"), counts
    got, want = metrics(runs["on"]), metrics(runs["off"])
    assert [r["step"] for r in got] == [r["step"] for r in want] == [1, 2, 3, 4]
    for r, w in zip(got, want):
        assert r["loss"] == w["loss"] and r["grad_norm"] == w["grad_norm"], r["step"]
    assert got[-1]["eval_loss"] == want[-1]["eval_loss"]
    a, b = final_weights(runs["on"]), final_weights(runs["off"])
    assert all(torch.equal(a[k], b[k]) for k in b)
