"""Checkpoint durability: async saves hold the state of their step, killed saves are cleaned up,
`latest` is rebuilt, and pruning never touches what this run may not delete."""

import json
from types import SimpleNamespace

import pytest
import torch

from megamoe.checkpoint.files import CheckpointError
from megamoe.checkpoint.io import CheckpointWriter, latest_checkpoint, load_checkpoint, recover_checkpoints, save_checkpoint
from megamoe.checkpoint.writer import step_dir_name
from megamoe.config import ConfigError, load_config

STATE = SimpleNamespace(rank=0, world_size=1, tp=1, pp=1, ep=1, dp=1, tp_rank=0, dp_rank=0, edp_rank=0)
CONFIG = {"train": {"seed": 1}, "parallel": {"zero_stage": 0}}


def _model_and_adam():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    return model, opt


def _snapshot(model, opt):
    return [t.clone() for p in model.parameters() for t in (p, opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"])]


def test_async_save_holds_the_state_of_its_step_while_training_goes_on(tmp_path):
    model, opt = _model_and_adam()
    at_save = _snapshot(model, opt)
    writer = CheckpointWriter(tmp_path, 0, 1, background=True)
    save_checkpoint(writer, 1, model, opt, STATE, {"config": CONFIG})
    for _ in range(3):  # training changes every weight and moment while the thread writes
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    writer.wait()
    assert latest_checkpoint(tmp_path).name == step_dir_name(1)
    fresh, fresh_opt = _model_and_adam()
    load_checkpoint(tmp_path / step_dir_name(1), fresh, fresh_opt, STATE)
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(fresh, fresh_opt), at_save))


def test_failed_background_write_is_reported_at_the_next_wait(tmp_path):
    writer = CheckpointWriter(tmp_path, 0, 1, background=True)
    tmp = tmp_path / ".step_00000001.tmp-x"
    tmp.mkdir()

    def broken():
        raise OSError(28, "No space left on device")

    writer.submit(1, tmp, broken, {})
    with pytest.raises(CheckpointError, match="step_00000001 failed on rank 0.*No space left"):
        writer.wait()
    assert latest_checkpoint(tmp_path) is None


def _fake_checkpoint(root, step, complete=True):
    d = root / step_dir_name(step)
    d.mkdir(parents=True)
    (d / "model-rank00000.safetensors").write_bytes(b"x")
    files = {"model-rank00000.safetensors": "0"} | ({} if complete else {"optim-rank00000.safetensors": "0"})
    (d / "meta.json").write_text(json.dumps({"format": 2, "files": files}))
    return d


def _write_one_file(tmp):
    (tmp / "model-rank00000.safetensors").write_bytes(b"x")
    return {"model-rank00000.safetensors": "0"}


def test_start_removes_killed_saves_and_rebuilds_a_missing_or_dangling_latest(tmp_path, capsys):
    _fake_checkpoint(tmp_path, 2)
    _fake_checkpoint(tmp_path, 4)
    _fake_checkpoint(tmp_path, 6, complete=False)  # a file its meta.json lists is gone
    stale = tmp_path / ".step_00000008.tmp-1234abcd"
    stale.mkdir()
    (stale / "model-rank00000.safetensors").write_bytes(b"half")
    assert recover_checkpoints(tmp_path).name == "step_00000004"  # no `latest`: rebuilt
    assert (tmp_path / "latest").read_text() == "step_00000004\n" and not stale.exists()
    (tmp_path / "latest").write_text("step_00000009\n")  # dangling
    assert recover_checkpoints(tmp_path).name == "step_00000004"
    assert "step_00000009, which is not a checkpoint" in capsys.readouterr().out
    (tmp_path / "latest").write_text("step_00000002\n")  # pointed back on purpose: kept
    assert recover_checkpoints(tmp_path).name == "step_00000002"


def test_step_dirs_without_any_complete_checkpoint_are_refused(tmp_path):
    _fake_checkpoint(tmp_path, 2, complete=False)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        recover_checkpoints(tmp_path)


def test_prune_never_deletes_checkpoints_newer_than_the_resume_point_it_did_not_write(tmp_path):
    for step in (2, 4, 6):
        _fake_checkpoint(tmp_path, step)
    writer = CheckpointWriter(tmp_path, 0, 1, keep=1, resume_step=4)  # resumed from 4; 6 is not ours
    for step in (5, 7):
        tmp = tmp_path / f".{step_dir_name(step)}.tmp-x"
        tmp.mkdir()
        writer.submit(step, tmp, lambda t=tmp: _write_one_file(t), {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_00000006", "step_00000007"]
    assert latest_checkpoint(tmp_path).name == "step_00000007"


@pytest.mark.parametrize("keep,kept", [(0, [1, 2, 3, 4]), (3, [2, 3, 4]), (-1, None)])
def test_keep_checkpoints_zero_keeps_all_and_negative_is_refused(tmp_path, keep, kept):
    cfg = load_config(None, [f"train.keep_checkpoints={keep}"])
    if kept is None:
        with pytest.raises(ConfigError, match="train.keep_checkpoints"):
            cfg.validate()
        return
    cfg.validate()
    writer = CheckpointWriter(tmp_path, 0, 1, keep=keep)
    for step in (1, 2, 3, 4):
        tmp = tmp_path / f".{step_dir_name(step)}.tmp-x"
        tmp.mkdir()
        writer.submit(step, tmp, lambda t=tmp: _write_one_file(t), {})
    assert sorted(p.name for p in tmp_path.glob("step_*")) == [step_dir_name(step) for step in kept]
