"""Every launcher reaches `python -m megamoe.train` with the same world; preemption resumes.

Unit: `discover_env` under each launcher's variables, and the errors for partial or
contradictory ones. End to end: torchrun, the deepspeed launcher and mpirun each start 2 CPU
ranks that agree on the world and train; SIGUSR1 to one rank stops both on the same step
with a checkpoint and EXIT_REQUEUE, and a rerun resumes; Slurm runs slurm/train.sbatch on 2
tasks, then a USR1 → checkpoint → requeue → resume cycle.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

from distributed import run_ranks
from helpers_launch import (ENDED, EXIT_REQUEUE, checkpoint_world_size, describe, job_output,
                            job_state, last_step, latest_step, launch_env, rank_reports,
                            require_slurm, run_script, sbatch, sbatch_cpu_options, train_args,
                            wait_job, wait_until)
from megamoe.distributed import DistEnv, LaunchError, discover_env
from megamoe.train.signals import EXIT_REQUEUE as TRAINER_EXIT_REQUEUE
from megamoe.train.signals import PreemptionHandler
from runs import REPO, free_port, metrics

MASTER = {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}


# discover_env ---------------------------------------------------------------------------------

def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RUN_ID": "x", **MASTER}
    assert discover_env(env) == DistEnv(3, 8, 1, 2, "10.0.0.1", 29500, "torchrun")


def test_deepspeed_launcher_variables():
    env = {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_SIZE": "4", "CROSS_RANK": "1",
           **MASTER}
    assert discover_env(env) == DistEnv(5, 8, 1, 4, "10.0.0.1", 29500, "deepspeed")


def test_open_mpi_variables():
    env = {"OMPI_COMM_WORLD_RANK": "2", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0", "OMPI_COMM_WORLD_LOCAL_SIZE": "2", **MASTER}
    assert discover_env(env) == DistEnv(2, 4, 0, 2, "10.0.0.1", 29500, "mpirun")


def test_srun_variables_give_first_host_and_job_port():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "4", "SLURM_LOCALID": "1", "SLURM_NODEID": "1",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "12345", "SLURM_JOB_NODELIST": "gpu7",
           "SLURM_STEP_TASKS_PER_NODE": "2(x2)"}
    assert discover_env(env) == DistEnv(3, 4, 1, 2, "gpu7", 20000 + 12345 % 20000, "srun")


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="needs scontrol to expand node lists")
def test_srun_node_range_expands_with_scontrol():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
           "SLURM_STEP_ID": "0", "SLURM_JOB_ID": "7", "SLURM_JOB_NODELIST": "gpu[3-4],cpu1",
           "SLURM_STEP_TASKS_PER_NODE": "1(x3)"}
    assert discover_env(env).master_addr == "gpu3"


def test_torchrun_inside_a_slurm_allocation_is_torchrun():
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
           "TORCHELASTIC_RUN_ID": "x", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0",
           **MASTER}
    assert discover_env(env).launcher == "torchrun"


def test_plain_process_is_a_world_of_one():
    env = discover_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("variables, words", [
    ({"WORLD_SIZE": "2"}, ["RANK", "LOCAL_RANK", "not"]),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}, ["MASTER_ADDR", "MASTER_PORT"]),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **MASTER}, ["rank 2", "world size 2"]),
    ({"RANK": "one", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **MASTER}, ["RANK='one'"]),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"}, ["srun", "SLURM_STEP_ID"]),
    ({"OMPI_COMM_WORLD_RANK": "0", **MASTER}, ["OMPI_COMM_WORLD_SIZE"]),
])
def test_partial_or_contradictory_variables_name_the_problem(variables, words):
    with pytest.raises(LaunchError) as e:
        discover_env(variables)
    for word in words:
        assert word in str(e.value)


# Preemption flag ------------------------------------------------------------------------------

def _stop_step(rank: int, world_size: int) -> tuple[int, str | None]:
    """Rank 1 signals itself during step 3; every rank reports the step it stopped after."""
    with PreemptionHandler() as preempt:
        for step in range(1, 100):
            if rank == 1 and step == 3:
                os.kill(os.getpid(), signal.SIGUSR1)
            if preempt.should_stop():
                return step, preempt.received and preempt.received.name
    return -1, None


def test_one_signalled_rank_stops_every_rank_on_the_same_step():
    assert run_ranks(_stop_step, 2) == [(3, None), (3, "SIGUSR1")]


def test_sigterm_is_recorded_and_previous_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as preempt:
        assert not preempt.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preempt.should_stop() and preempt.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# Launch scripts: bad input fails before anything starts --------------------------------------

@pytest.mark.parametrize("script, args", [
    ("launchers/deepspeed.sh", ["--hostfile", "/no/such/hostfile"]),
    ("launchers/mpirun.sh", ["-np", "2", "--hostfile", "/no/such/hostfile"]),
])
def test_missing_hostfile_is_refused(script, args):
    proc = run_script([script, *args, "--", "--config", "configs/tiny-cpu.yaml"], timeout=30)
    assert proc.returncode == 2 and "hostfile '/no/such/hostfile' not found" in proc.stderr, describe(proc)


def test_multinode_without_hostfile_or_rendezvous_is_refused():
    proc = run_script(["launchers/deepspeed.sh", "--num_nodes", "2", "--"], timeout=30)
    assert proc.returncode == 2 and "needs --hostfile" in proc.stderr, describe(proc)
    proc = run_script(["launchers/torchrun.sh", "--nnodes", "2", "--"], timeout=30)
    assert proc.returncode == 2 and "needs --rdzv_endpoint" in proc.stderr, describe(proc)


def test_world_that_does_not_fit_the_layout_fails_before_training(tmp_path):
    run = tmp_path / "run"
    proc = run_script(["launchers/torchrun.sh", "--nproc_per_node", "2", "--",
                       *train_args(run, "parallel.tensor=4")])
    assert proc.returncode == 2, describe(proc)
    assert "world size 2 is not divisible by tensor×pipeline=4" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


def test_rank_variable_without_its_launcher_fails_before_training(tmp_path):
    run = tmp_path / "run"
    env = {k: v for k, v in launch_env(RANK="1").items() if k not in ("WORLD_SIZE", "LOCAL_RANK")}
    proc = run_script([sys.executable, "-m", "megamoe.train", *train_args(run)], env=env, timeout=60)
    assert proc.returncode == 2, describe(proc)
    assert "RANK set but WORLD_SIZE, LOCAL_RANK not" in proc.stderr
    assert not (run / "metrics.jsonl").exists()


# Launchers end to end -------------------------------------------------------------------------

LAUNCHERS = {  # script, options for 2 CPU ranks on this host
    "torchrun": ["launchers/torchrun.sh", "--nproc_per_node", "2"],
    "deepspeed": ["launchers/deepspeed.sh", "--num_gpus", "2"],
    "mpirun": ["launchers/mpirun.sh", "-np", "2"],
}


@pytest.mark.parametrize("launcher", LAUNCHERS)
def test_launcher_starts_two_ranks_that_agree_and_train(launcher, tmp_path):
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.skip("Open MPI's mpirun is not installed (.ci/setup-system.sh installs it)")
    check = run_script([*LAUNCHERS[launcher], "--"],
                       env=launch_env(MEGAMOE_MODULE="megamoe.distributed"))
    assert check.returncode == 0, describe(check)
    reports = rank_reports(check.stdout)
    assert [r["rank"] for r in reports] == ["0", "1"], describe(check)
    for r in reports:
        assert (r["world_size"], r["launcher"], r["allreduce_world"]) == ("2", launcher, "2")
    assert len({(r["master_addr"], r["master_port"]) for r in reports}) == 1

    run = tmp_path / "run"
    proc = run_script([*LAUNCHERS[launcher], "--", *train_args(run, "train.steps=3")])
    assert proc.returncode == 0, describe(proc)
    assert "world 2 = pp 1 × dp 2" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3]
    assert latest_step(run) == 3 and checkpoint_world_size(run) == 2


def test_deepspeed_multinode_path_reads_the_hostfile(tmp_path):
    """The hostfile path of the deepspeed launcher (its Open MPI backend), on this one host."""
    if shutil.which("mpirun") is None:
        pytest.skip("Open MPI's mpirun is not installed (.ci/setup-system.sh installs it)")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    check = run_script(["launchers/deepspeed.sh", "--hostfile", str(hostfile), "--launcher", "openmpi",
                        "--force_multi", "--no_ssh_check", "--master_addr", "127.0.0.1", "--"],
                       env=launch_env(MEGAMOE_MODULE="megamoe.distributed", OMPI_ALLOW_RUN_AS_ROOT="1",
                                      OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1"))
    assert check.returncode == 0, describe(check)
    assert "mpirun -n 2 -hostfile" in check.stdout + check.stderr
    assert [(r["rank"], r["world_size"], r["allreduce_world"]) for r in rank_reports(check.stdout)] == [
        ("0", "2", "2"), ("1", "2", "2")], describe(check)


def test_torchrun_two_node_rendezvous(tmp_path):
    """Two torchrun agents, one per "node", meet at a c10d rendezvous endpoint."""
    env = launch_env(MEGAMOE_MODULE="megamoe.distributed")
    cmd = ["launchers/torchrun.sh", "--nnodes", "2", "--nproc_per_node", "1",
           "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "test", "--"]
    nodes = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outs = [node.communicate(timeout=120)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    reports = rank_reports("\n".join(outs))
    assert [(r["rank"], r["world_size"], r["local_world_size"], r["launcher"]) for r in reports] == [
        ("0", "2", "1", "torchrun"), ("1", "2", "1", "torchrun")], outs


# Preemption end to end ------------------------------------------------------------------------

def test_signal_to_one_rank_checkpoints_exits_requeue_and_resumes(tmp_path):
    assert EXIT_REQUEUE == TRAINER_EXIT_REQUEUE
    run = tmp_path / "run"
    cmd = [*LAUNCHERS["torchrun"], "--", *train_args(run, "train.steps=5000")]
    launcher = subprocess.Popen(cmd, cwd=REPO, env=launch_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: last_step(run) >= 2 or launcher.poll() is not None, 90, "step 2")
        ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
                 if "megamoe.train" in p.cmdline() and p.environ().get("LOCAL_RANK") == "1"]
        assert len(ranks) == 1, launcher.communicate(timeout=10)[0][-4000:]
        ranks[0].send_signal(signal.SIGUSR1)
        out, _ = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == EXIT_REQUEUE, out[-4000:]
    stopped = latest_step(run)
    assert f"checkpoint at step {stopped} saved, exiting {EXIT_REQUEUE}" in out
    assert metrics(run)[-1]["step"] == stopped

    proc = run_script([*LAUNCHERS["torchrun"], "--",
                       *train_args(run, f"train.steps={stopped + 2}")])
    assert proc.returncode == 0, describe(proc)
    assert f"resuming at step {stopped}" in proc.stdout + proc.stderr
    assert [r["step"] for r in metrics(run)][-3:] == [stopped, stopped + 1, stopped + 2]


# Slurm ----------------------------------------------------------------------------------------

def test_slurm_dry_run_prints_the_srun_command():
    proc = run_script(["bash", "slurm/train.sbatch", "--config", "configs/tiny-cpu.yaml"],
                      env=launch_env(MEGAMOE_DRY_RUN="1"), timeout=30)
    assert proc.returncode == 0, describe(proc)
    assert "srun --label --gpu-bind=none --kill-on-bad-exit=0 python -m megamoe.train --config configs/tiny-cpu.yaml" \
        in proc.stdout


def test_slurm_multinode_job_trains_on_two_nodes(tmp_path):
    require_slurm(nodes=2)
    run = tmp_path / "run"
    job = sbatch(tmp_path, train_args(run, "train.steps=3"), "slurm/train-multinode.sbatch",
                 nodes=2, ntasks=1)
    state = wait_job(job, ENDED, timeout=150)
    out = job_output(tmp_path, job)
    assert state == "COMPLETED", out[-4000:]
    reports = rank_reports(out)
    assert [(r["rank"], r["world_size"], r["local_world_size"]) for r in reports] == [
        ("0", "2", "1"), ("1", "2", "1")], out[-4000:]
    assert "world 2 = pp 1 × dp 2" in out
    assert latest_step(run) == 3 and checkpoint_world_size(run) == 2


def test_slurm_usr1_checkpoints_requeues_and_resumes(tmp_path):
    require_slurm()
    run = tmp_path / "run"
    job = sbatch(tmp_path, train_args(run, "train.steps=5000"))
    try:
        wait_until(lambda: last_step(run) >= 2, 120, "step 2",
                   alive=lambda: job_state(job) in {"PENDING", "RUNNING"})
        subprocess.run(["scancel", "--signal=USR1", str(job)], check=True)
        # The ranks save and exit 75 and the job requeues itself. Slurm holds a requeued job
        # for ~2 minutes (BeginTime); let it start sooner, then it resumes.
        wait_until(lambda: job_state(job) == "PENDING", 60, "requeued job")

        # Not at once: slurmd refuses a job credential made in the same second the old one was
        # revoked ("Job credential revoked", the job then fails), seen in CI. Then every 5 s
        # while pending, in case slurmctld set the requeue's BeginTime after an update.
        released = [time.monotonic()]

        def resumed() -> bool:
            if time.monotonic() - released[0] > 5 and job_state(job) == "PENDING":
                subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
                released[0] = time.monotonic()
            return "resuming at step" in job_output(tmp_path, job) and last_step(run) > latest_step(run)

        try:
            wait_until(resumed, 150, "resumed step after the requeue")
        except AssertionError as e:
            shown = subprocess.run(["scontrol", "show", "job", str(job)], capture_output=True, text=True)
            raise AssertionError(f"{e}\n{shown.stdout}\n{job_output(tmp_path, job)[-3000:]}") from None
    finally:
        subprocess.run(["scancel", str(job)])
    out = job_output(tmp_path, job)
    stopped = int(out.split("checkpoint at step ")[1].split()[0])
    assert "requeueing job" in out and "(restart 1)" in out, out[-4000:]
    assert f"resuming at step {stopped}" in out
    assert stopped + 1 in [r["step"] for r in metrics(run)]


def test_slurm_job_trains_on_two_tasks_and_a_chained_job_resumes(tmp_path):
    require_slurm()
    run = tmp_path / "run"
    proc = run_script(["slurm/chain.sh", "2", "slurm/train.sbatch", *sbatch_cpu_options(tmp_path), "--",
                       *train_args(run, "train.steps=3")], timeout=30)
    assert proc.returncode == 0, describe(proc)
    first, second = [int(line.split()[-1]) for line in proc.stdout.splitlines()]
    assert wait_job(first, ENDED, timeout=150) == "COMPLETED", job_output(tmp_path, first)[-4000:]
    out = job_output(tmp_path, first)
    reports = rank_reports(out)
    assert [(r["rank"], r["world_size"], r["launcher"]) for r in reports] == [
        ("0", "2", "srun"), ("1", "2", "srun")], out[-4000:]
    assert "world 2 = pp 1 × dp 2" in out and "new run" in out
    assert latest_step(run) == 3 and checkpoint_world_size(run) == 2

    assert wait_job(second, ENDED, timeout=150) == "COMPLETED", job_output(tmp_path, second)[-4000:]
    assert "resuming at step 3" in job_output(tmp_path, second)
