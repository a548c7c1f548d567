"""Start megamoe through the real launch scripts and Slurm, and read what the ranks said.

The launch check (`python -m megamoe.distributed`) prints one `megamoe.distributed ...` line
per rank; `rank_reports` parses them. Slurm helpers need the one-node cluster of
slurm/local_cluster.sh; `require_slurm` skips without it locally and fails under CI=true.
"""

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from megamoe.checkpoint.canonical import resolve
from megamoe.checkpoint.files import read_meta
from runs import REPO, TINY, free_port, metrics

EXIT_REQUEUE = 75


def launch_env(**extra: str) -> dict:
    """The test process's environment for a launch: one thread per rank, a free port."""
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), MASTER_PORT=str(free_port()),
                **extra)


def run_script(args: list[str], env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    """Run a launcher script from the repository root; stdout and stderr come back as text."""
    return subprocess.run(args, cwd=REPO, env=env or launch_env(), capture_output=True, text=True,
                          timeout=timeout)


def describe(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def rank_reports(text: str) -> list[dict]:
    """The `megamoe.distributed key=value ...` lines of a launch check, sorted by rank."""
    reports = [dict(kv.split("=", 1) for kv in m.group(1).split())
               for m in re.finditer(r"megamoe\.distributed (rank=.*?)$", text, re.M)]
    return sorted(reports, key=lambda r: int(r["rank"]))


def train_args(run_dir: Path, *overrides: str) -> list[str]:
    """`python -m megamoe.train` arguments: the tiny CPU model, 2 data-parallel ranks."""
    return [*TINY, "train.global_batch_size=4", *overrides, f"run.dir={run_dir}"]


def wait_until(predicate, timeout: float, what: str, alive=lambda: True) -> None:
    """Poll `predicate` until true; fail after `timeout` s or once `alive()` turns false."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"no {what} after {timeout}s"
        time.sleep(0.3)


def last_step(run_dir: Path) -> int:
    """The last step in metrics.jsonl (0 while there is none or a line is half-written)."""
    try:
        records = metrics(run_dir)
    except (FileNotFoundError, ValueError):
        return 0
    return records[-1]["step"] if records else 0


def latest_step(run_dir: Path) -> int:
    return int(resolve(run_dir).name.removeprefix("step_"))


def checkpoint_world_size(run_dir: Path) -> int:
    """The number of ranks that wrote the latest checkpoint (its meta.json)."""
    return read_meta(resolve(run_dir))["world_size"]


# Slurm --------------------------------------------------------------------------------------

def require_slurm(nodes: int = 1) -> None:
    """Skip (locally) or fail (CI=true) unless Slurm answers with `nodes` nodes up."""
    if shutil.which("sinfo") is None:
        problem = "Slurm is not installed (no sinfo)"
    else:
        states = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True)
        up = {line.split()[0] for line in states.stdout.splitlines()
              if re.search(r" (idle|mixed|allocated)", line)}
        if states.returncode == 0 and len(up) >= nodes:
            return
        problem = (f"{len(up)} Slurm node(s) up, {nodes} needed "
                   f"(sinfo: {states.stdout.strip() or states.stderr.strip()})")
    fix = "run .ci/setup-system.sh && slurm/local_cluster.sh start"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{problem}; CI must run the Slurm tests: {fix}")
    pytest.skip(f"{problem}; to run these tests: {fix}")


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "GONE"}


def sbatch_cpu_options(out_dir: Path, ntasks: int = 2, nodes: int = 1) -> list[str]:
    """sbatch options for `ntasks` CPU ranks on each of `nodes` nodes, job output in `out_dir`."""
    return [f"--nodes={nodes}", f"--ntasks-per-node={ntasks}", "--gpus-per-node=0", "--cpus-per-task=1",
            "--time=10", f"--output={out_dir}/%x-%j.out", f"--error={out_dir}/%x-%j.err"]


def sbatch(out_dir: Path, train: list[str], script: str = "slurm/train.sbatch", **options) -> int:
    """Submit `script` on CPU ranks (2 on one node unless `options` say otherwise); the job id."""
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_cpu_options(out_dir, **options), script,
                           *train], cwd=REPO, env=launch_env(), capture_output=True, text=True,
                          check=True)
    return int(proc.stdout.strip().split(";")[0])


def job_state(job_id: int) -> str:
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    m = re.search(r"JobState=(\S+)", out)
    return m.group(1) if m else "GONE"


def wait_job(job_id: int, done: set[str], timeout: float) -> str:
    """Poll until the job's state is in `done`; return it."""
    wait_until(lambda: job_state(job_id) in done, timeout, f"end of job {job_id}")
    return job_state(job_id)


def job_output(out_dir: Path, job_id: int) -> str:
    return "".join(p.read_text() for p in sorted(out_dir.glob(f"*-{job_id}.*")))
