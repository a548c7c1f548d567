"""Run safety: one job per run directory, a relaunch after a failed launch, no orphaned workers, no silent hang."""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from megamoe.config import ConfigError, load_config
from megamoe.train.rundir import LOCK, RunLock
from runs import REPO, TINY, Job, alive, launch, metrics


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError) as e:
        RunLock(tmp_path).acquire()
    msg = str(e.value)
    assert "in use by another job" in msg and socket.gethostname() in msg and f"pid {os.getpid()}" in msg
    assert "started 20" in msg
    first.release()
    assert not (tmp_path / LOCK).exists()
    RunLock(tmp_path).acquire().release()  # free again once released


def test_lock_of_a_killed_job_is_taken_over(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from megamoe.train.rundir import RunLock; "
         f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(ConfigError, match=f"pid {holder.pid}"):
        RunLock(tmp_path).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK).exists()  # a kill -9 leaves the file, but not the flock
    lock = RunLock(tmp_path).acquire()
    assert f"pid {holder.pid}" in capsys.readouterr().out  # "taking over ..., left by ..."
    assert f'"pid": {os.getpid()}' in (tmp_path / LOCK).read_text()
    lock.release()


def test_concurrent_launch_is_refused_at_once_and_the_first_job_is_untouched(tmp_path):
    run = tmp_path / "run"
    lock = RunLock(run.parent / "run")
    run.mkdir()
    lock.acquire()  # a job holds the directory (as rank 0 of a live run would)
    proc = launch(run, 1, [], check=False)
    lock.release()
    assert proc.returncode == 2
    assert "megamoe: error: run.dir:" in proc.stderr and f"pid {os.getpid()}" in proc.stderr
    assert list(run.iterdir()) == []  # the refused job wrote nothing


def test_relaunch_after_a_failed_launch_may_change_the_config(tmp_path):
    """A launch that failed before its first checkpoint leaves a config.yaml but no state:
    the corrected relaunch starts there, the first config kept as config.<time>.yaml."""
    run = tmp_path / "run"
    proc = launch(run, 1, ["train.steps=1", "data.paths=[/nonexistent/data]", "data.tokenizer=/nonexistent/tok.model"],
                  check=False)
    assert proc.returncode == 2 and "megamoe: error: data.tokenizer" in proc.stderr
    assert not run.exists()  # refused before the run directory was touched
    run.mkdir()  # what a launch that failed after writing its config (before any checkpoint) leaves
    load_config(None, [*TINY, "model.d_model=64"]).save(run / "config.yaml")
    launch(run, 1, ["train.steps=1"])
    assert [r["step"] for r in metrics(run)] == [1]
    assert len(list(run.glob("config.*.yaml"))) == 1 and not (run / LOCK).exists()


def test_workers_exit_when_their_launcher_is_killed(tmp_path):
    job = Job(tmp_path / "run", 2, ["train.steps=2000"])
    job.wait_for("step      1/")
    workers = job.workers()
    assert sorted(workers) == [0, 1]
    os.kill(job.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 15
    while any(alive(p) for p in workers.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in workers.values()), "workers outlived their launcher"


def test_a_collective_that_waits_too_long_ends_the_job_naming_rank_and_operation(tmp_path):
    job = Job(tmp_path / "run", 2, ["train.steps=2000", "train.collective_timeout_s=4"])
    job.wait_for("step      1/")
    stopped = job.workers()[1]
    os.kill(stopped, signal.SIGSTOP)  # rank 1 hangs: rank 0 waits for it in its next collective
    try:
        job.wait_for("megamoe: error: rank 0: ", timeout=120)
    finally:
        os.kill(stopped, signal.SIGKILL)
    assert job.proc.wait(timeout=60) != 0
    out = "".join(job.lines)
    assert re.search(r"rank 0: \w+ waited longer than train.collective_timeout_s=4 s", out), out[-3000:]


def test_checkpoints_none_of_which_is_complete_are_one_error_not_a_new_run(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=1"])
    (run / "checkpoints" / "latest").unlink()
    (run / "checkpoints" / "step_00000001" / "meta.json").unlink()
    proc = launch(run, 1, ["train.steps=2"], check=False, timeout=120)
    assert proc.returncode == 2 and "megamoe: error: run.dir:" in proc.stderr, proc.stderr[-2000:]
    assert "no complete checkpoint" in proc.stderr and "Traceback" not in proc.stderr
    assert (run / "checkpoints" / "step_00000001").is_dir()  # nothing deleted
