"""Fault injection: `kill -9` of one rank or of the whole job, at random steps and during saves,
a concurrent launch, damaged files. Each interrupted run, resumed until done, ends with the
weights of the uninterrupted run bit for bit."""

import os
import random
import re
import signal
import socket
import time

import pytest
import torch

from megamoe.checkpoint.io import latest_checkpoint
from megamoe.train.rundir import LOCK
from runs import Job, alive, final_weights, launch, metrics

STEPS = 6
RUN = [f"train.steps={STEPS}", "train.save_interval=1", "train.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-rank run (synchronous saves: the interrupted runs save asynchronously)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    launch(run, 2, [*RUN, "train.async_save=false"])
    return run


def test_two_jobs_started_together_on_one_run_dir_one_is_refused(tmp_path):
    """Neither sees the other's half-made directory as foreign: the lock decides, and the loser
    names the winner and leaves its run alone."""
    run = tmp_path / "run"
    jobs = [Job(run, 1, ["train.steps=30"]) for _ in range(2)]
    codes = sorted(job.proc.wait(timeout=300) for job in jobs)
    out = ["".join(job.lines) for job in jobs]
    assert codes == [0, 2], out
    loser = next(o for o, job in zip(out, jobs) if job.proc.returncode == 2)
    winner = next(job for job in jobs if job.proc.returncode == 0)
    assert f"is in use by another job (host {socket.gethostname()}, pid {winner.proc.pid}" in loser, loser
    assert [r["step"] for r in metrics(run)] == list(range(1, 31))  # one run's records only


def _kill_once(run, rng: random.Random) -> tuple[str, bool]:
    """Start the run (it resumes), then kill -9 a rank or the whole job after a random step or
    while a checkpoint is being written; returns what was done and whether the kill ended the job
    (not when the job had finished first)."""
    job = Job(run, 2, RUN)
    job.wait_for("megamoe: world")  # past the start's clean-up of what earlier kills left
    resumed = int(re.search(r"resuming at step (\d+)|$", "".join(job.lines))[1] or 0)
    victim = rng.choice(["rank 0", "rank 1", "the job"])
    if rng.random() < 0.5 and resumed < STEPS - 1:
        step = rng.randint(resumed + 1, STEPS - 1)
        moment = f"after step {step}"
        job.wait_for(f"step {step:>6}/")
    else:
        moment = "during a save"
        ckpts = run / "checkpoints"
        while job.proc.poll() is None and not any(ckpts.glob(".step_*.tmp-*")):
            time.sleep(0.001)
    workers = job.workers()
    targets = [*workers.values(), job.proc.pid] if victim == "the job" else [workers.get(int(victim[-1]))]
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, TypeError):  # the job ended first (or that rank had)
            moment += " (the job had ended)"
    job.proc.wait(timeout=120)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in workers.values()):
        assert time.monotonic() < deadline, "a worker survived its job"
        time.sleep(0.1)
    landed = job.proc.returncode != 0 and "(the job had ended)" not in moment
    return f"resumed at {resumed}, killed {victim} {moment} (exit {job.proc.returncode})", landed


def test_kill_9_anywhere_resumes_to_the_uninterrupted_weights(tmp_path, reference):
    run = tmp_path / "run"
    rng = random.Random(1234)
    done, landed = zip(*[_kill_once(run, rng) for _ in range(3)])
    assert any(landed), done  # at least one kill ended a job before its last step
    assert metrics(run)[-1]["step"] < STEPS or not landed[-1], done
    launch(run, 2, RUN)  # finishes what the kills left
    got, want = final_weights(run), final_weights(reference)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), done
    print("\n".join(done))
    ckpts = run / "checkpoints"
    assert not list(ckpts.glob(".*tmp*")) and not (run / LOCK).exists(), done
    assert latest_checkpoint(ckpts).name == f"step_{STEPS:08d}"
    assert len(list(ckpts.glob("step_*"))) == 2  # keep_checkpoints, whatever the kills left

    # a damaged checkpoint is named, not loaded
    optim = next(latest_checkpoint(ckpts).glob("optim-rank*.safetensors"))
    optim.write_bytes(optim.read_bytes()[: optim.stat().st_size // 2])
    proc = launch(run, 1, [*RUN[1:], f"train.steps={STEPS + 1}"], check=False)
    assert proc.returncode == 2 and optim.name in proc.stderr and "corrupt or truncated" in proc.stderr
