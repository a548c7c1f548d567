"""Run safety: one job per run directory, a relaunch after a failed launch."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from megamoe.config import ConfigError
from megamoe.train.rundir import LOCK, RunLock
from runs import REPO, launch, metrics


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
    assert proc.returncode != 0 and not (run / LOCK).exists()
    launch(run, 1, ["train.steps=1"])
    assert [r["step"] for r in metrics(run)] == [1]
    assert len(list(run.glob("config.*.yaml"))) == 1 and not (run / LOCK).exists()
