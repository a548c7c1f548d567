"""Where this process sits in the job, whichever launcher started it, and the process group.

`discover_env()` reads the variables of torchrun, the `deepspeed` launcher, mpirun (Open MPI,
or any MPI through mpi4py) and Slurm's `srun`, or finds a plain single process, and returns
one `DistEnv`. `init_distributed(env)` turns that into a torch process group. Discovery is
kept free of torch so that `python -m megamoe.distributed` answers quickly; it prints what
every rank sees, the first thing to run when a new cluster launch misbehaves.
"""

import argparse
import contextlib
import io
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

LOCALHOST = "127.0.0.1"
# The port a Slurm job's rank 0 listens on, so that jobs sharing a node do not collide.
# slurm/*.sbatch export the same value (bash); keep the two in step.
SLURM_PORT_BASE, SLURM_PORT_SPAN = 20000, 20000
RANK_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


class LaunchError(RuntimeError):
    """The launch variables are missing, partial or contradictory; the message says the fix."""


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the job, as its launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | deepspeed | env | mpirun | srun | single

    @property
    def node_rank(self) -> int:
        return self.rank // self.local_world_size

    def __post_init__(self):
        problems = []
        if self.world_size < 1:
            problems.append(f"world size {self.world_size} < 1")
        if not 0 <= self.rank < self.world_size:
            problems.append(f"rank {self.rank} is outside [0, world size {self.world_size})")
        if not 1 <= self.local_world_size <= self.world_size:
            problems.append(f"local world size {self.local_world_size} is outside "
                            f"[1, world size {self.world_size}]")
        if not 0 <= self.local_rank < self.local_world_size:
            problems.append(f"local rank {self.local_rank} is outside "
                            f"[0, local world size {self.local_world_size})")
        if not 0 < self.master_port < 65536:
            problems.append(f"master port {self.master_port} is not a TCP port")
        if problems:
            raise LaunchError(f"inconsistent launch variables from {self.launcher}: "
                              + "; ".join(problems) + ". Check the launcher's arguments "
                              "(--nproc_per_node, -np, --ntasks) and any rank variables "
                              "exported by hand in the job script.")


def discover_env(environ: dict | None = None) -> DistEnv:
    """Read the launcher's variables from `environ` (default os.environ) into a DistEnv.

    Precedence: explicit RANK/WORLD_SIZE (torchrun, deepspeed, or set by hand) over MPI
    over srun, because torchrun or mpirun started inside a Slurm allocation inherit the
    allocation's SLURM_* variables, which then describe the allocation and not this process.
    """
    env = os.environ if environ is None else environ
    present = [v for v in RANK_VARIABLES if v in env]
    if present:
        return _from_rank_variables(env, present)
    if "OMPI_COMM_WORLD_RANK" in env:
        return _from_mpi(env, "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                         "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE")
    if "PMI_RANK" in env:  # MPICH / Intel MPI (hydra)
        return _from_mpi(env, "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        return _from_srun(env)
    if "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS") > 1:
        raise LaunchError(
            f"this process runs inside a Slurm allocation of SLURM_NTASKS={env['SLURM_NTASKS']} "
            "tasks but was not started by srun (no SLURM_STEP_ID), so it cannot tell its rank. "
            "Start it with `srun python -m megamoe.train ...` (see slurm/train.sbatch).")
    return DistEnv(0, 1, 0, 1, env.get("MASTER_ADDR", LOCALHOST),
                   int(env.get("MASTER_PORT") or free_port()), "single")


def _from_rank_variables(env, present: list[str]) -> DistEnv:
    """torchrun and the deepspeed launcher both export RANK, WORLD_SIZE and LOCAL_RANK."""
    missing = [v for v in RANK_VARIABLES if v not in env]
    if missing:
        raise LaunchError(
            f"{', '.join(present)} set but {', '.join(missing)} not: no launcher sets only "
            "some of them. Launch with torchrun, deepspeed, mpirun or srun (launchers/, "
            f"slurm/), or when setting them by hand set all of {', '.join(RANK_VARIABLES)}"
            " plus MASTER_ADDR and MASTER_PORT.")
    world = _int(env, "WORLD_SIZE")
    if "TORCHELASTIC_RUN_ID" in env:
        launcher, local_size = "torchrun", _int(env, "LOCAL_WORLD_SIZE")
    elif "CROSS_RANK" in env:
        launcher, local_size = "deepspeed", _int(env, "LOCAL_SIZE")
    else:
        launcher = "env"
        local_size = _int(env, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in env else world
    if world > 1:
        unset = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not env.get(v)]
        if unset:
            raise LaunchError(
                f"WORLD_SIZE={world} but {' and '.join(unset)} unset: rank 0's address is "
                "needed to meet. Export MASTER_ADDR (rank 0's host) and MASTER_PORT "
                "(a free port there), or launch with torchrun/deepspeed, which set them.")
    return DistEnv(_int(env, "RANK"), world, _int(env, "LOCAL_RANK"), local_size,
                   env.get("MASTER_ADDR") or LOCALHOST,
                   int(env.get("MASTER_PORT") or free_port()), launcher)


def _from_mpi(env, rank_var, size_var, local_rank_var, local_size_var) -> DistEnv:
    """mpirun: ranks from the MPI variables; rank 0's address over MPI if not exported."""
    rank, world = _int(env, rank_var), _int(env, size_var)
    local_rank = _int(env, local_rank_var) if local_rank_var in env else 0
    local_size = _int(env, local_size_var) if local_size_var in env else 1
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if not addr or not port:
        addr, port = _mpi_broadcast_master(addr, port)
    return DistEnv(rank, world, local_rank, local_size, addr, int(port), "mpirun")


def _mpi_broadcast_master(addr: str | None, port: str | None) -> tuple[str, int]:
    """Rank 0 names its host and a free port; every rank receives them through mpi4py."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LaunchError(
            f"started by mpirun without MASTER_ADDR/MASTER_PORT, and mpi4py cannot be "
            f"imported ({e}) to share rank 0's address. `pip install mpi4py` against the "
            "MPI you launch with, or pass `-x MASTER_ADDR=<rank-0 host> -x MASTER_PORT=<port>` "
            "to mpirun.") from None
    comm = MPI.COMM_WORLD
    mine = (addr or socket.gethostname(), int(port or free_port())) if comm.rank == 0 else None
    master = comm.bcast(mine, root=0)
    # Done with MPI: the ranks meet through torch.distributed from here. A rank left inside
    # MPI would, on an early exit, block in MPI_Finalize at interpreter exit while its peers
    # wait for it in a torch collective: a silent deadlock instead of mpirun's abort.
    MPI.Finalize()
    return master


def _from_srun(env) -> DistEnv:
    """srun: one task per rank; rank 0 is the first host of the step's node list."""
    rank, world = _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    addr = env.get("MASTER_ADDR") or _first_slurm_host(env)
    port = env.get("MASTER_PORT") or SLURM_PORT_BASE + _int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
    local_size = _tasks_on_node(env.get("SLURM_STEP_TASKS_PER_NODE")
                                or env.get("SLURM_TASKS_PER_NODE", "1"),
                                int(env.get("SLURM_NODEID", 0)))
    return DistEnv(rank, world, _int(env, "SLURM_LOCALID"), local_size, addr, int(port), "srun")


def _first_slurm_host(env) -> str:
    """The address of the step's first node: its NodeAddr, which is its name by default."""
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise LaunchError("srun task without SLURM_JOB_NODELIST: cannot name rank 0's host. "
                          "Export MASTER_ADDR in the job script (see slurm/train.sbatch).")
    first = nodelist
    if re.search(r"[\[,]", nodelist):  # a list or range: expand it
        try:
            first = _scontrol("show", "hostnames", nodelist).split()[0]
        except (OSError, subprocess.CalledProcessError) as e:
            raise LaunchError(f"cannot expand SLURM_JOB_NODELIST={nodelist} with scontrol ({e}); "
                              "export MASTER_ADDR in the job script (see slurm/train.sbatch).") from None
    try:
        m = re.search(r"NodeAddr=(\S+)", _scontrol("show", "node", first, "-o"))
    except (OSError, subprocess.CalledProcessError):
        m = None  # no Slurm client here, or a node it does not know: use the name
    return m.group(1) if m else first


def _scontrol(*args: str) -> str:
    return subprocess.run(["scontrol", *args], check=True, capture_output=True, text=True).stdout


def _tasks_on_node(tasks_per_node: str, node_id: int) -> int:
    """Expand Slurm's compressed counts ("2(x3),1" = 2,2,2,1) and pick this node's."""
    counts = []
    for part in tasks_per_node.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            raise LaunchError(f"cannot parse SLURM_TASKS_PER_NODE={tasks_per_node!r}")
        counts += [int(m[1])] * int(m[2] or 1)
    return counts[node_id]


def _int(env, name: str) -> int:
    try:
        return int(env[name])
    except KeyError:
        raise LaunchError(f"{name} is not set, but the other variables of its launcher are; "
                          "relaunch with the launcher's own command rather than exporting "
                          "its variables by hand.") from None
    except ValueError:
        raise LaunchError(f"{name}={env[name]!r} is not an integer") from None


def free_port() -> int:
    """A TCP port free on this host right now (for single-host runs that name none)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_distributed(env: DistEnv, backend: str | None = None,
                     timeout: timedelta = timedelta(minutes=10)) -> str:
    """Create the default process group for `env` through DeepSpeed; return the backend.

    backend None picks nccl when CUDA is present (and binds this rank to GPU local_rank),
    else gloo. The torch-style variables are exported too, for libraries that read them.
    A collective of any group that waits longer than `timeout` fails (gloo: an exception,
    `collective_failure` names it; NCCL: its watchdog ends the process, naming rank and op).
    """
    import deepspeed
    import torch

    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        if env.local_rank >= torch.cuda.device_count():
            raise LaunchError(
                f"local rank {env.local_rank} but only {torch.cuda.device_count()} GPUs are "
                f"visible (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): "
                "start at most one rank per GPU on each node (--nproc_per_node, --num_gpus, "
                "--ntasks-per-node), and let every rank of a node see all its GPUs: megamoe and "
                "DeepSpeed pick GPU LOCAL_RANK, so per-task binding (srun --gpus-per-task, "
                "--gpu-bind) must be off.")
        torch.cuda.set_device(env.local_rank)
    exit_with_launcher(env)
    # Subgroups (ours and DeepSpeed's) take torch's default timeout, not the default group's.
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = distributed_c10d.default_pg_nccl_timeout = timeout
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size),
                      LOCAL_RANK=str(env.local_rank),
                      LOCAL_WORLD_SIZE=str(env.local_world_size),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
    # On CPU, DeepSpeed prints that its collective op "built successfully" on every rank of
    # every run, cached or not: that line is dropped, anything else it prints is kept.
    with contextlib.redirect_stdout(io.StringIO()) as said:
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout,
                                   rank=env.rank, world_size=env.world_size, verbose=False)
    sys.stdout.write("".join(line for line in said.getvalue().splitlines(True)
                             if "built successfully" not in line))
    return backend


def exit_with_launcher(env: DistEnv, interval_s: float = 1.0) -> None:
    """End this process when the launcher that started it dies (torchrun, deepspeed, mpirun).

    Workers run in their own session, so a `kill -9` of the launcher leaves them training and
    writing checkpoints. A daemon thread watches the parent: once this process is reparented,
    it exits. Plain and srun processes are left alone (a nohup'd run outlives its shell;
    Slurm ends its steps itself).
    """
    if env.launcher not in ("torchrun", "deepspeed", "mpirun"):
        return
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        sys.stderr.write(f"megamoe: error: rank {env.rank}: its launcher ({env.launcher}, pid {parent}) "
                         "is gone; exiting\n")
        sys.stderr.flush()
        os._exit(1)

    threading.Thread(target=watch, name="megamoe-launcher-watch", daemon=True).start()


def collective_failure(error: BaseException, timeout_s: float | None) -> str | None:
    """The one-line message for a collective that failed on this rank (None: not one).

    gloo raises a RuntimeError from inside the torch.distributed call: name that call, and why.
    """
    import traceback

    ops = [f.name for f in traceback.extract_tb(error.__traceback__)
           if f.filename.endswith("distributed_c10d.py")]
    if not ops or not isinstance(error, RuntimeError):
        return None
    rank = os.environ.get("RANK", "?")
    text = str(error)
    if "Timed out" in text or "timed out" in text:
        return (f"rank {rank}: {ops[-1]} waited longer than train.collective_timeout_s={timeout_s:g} s "
                "for the other ranks: one of them hangs, died or is far slower (see its log); raise "
                "train.collective_timeout_s if a step or a save legitimately takes longer")
    return f"rank {rank}: {ops[-1]} failed, a peer rank is gone ({text.splitlines()[0][:200]}); see the other ranks' logs"


def main() -> None:
    """Launch check: each rank prints its DistEnv, then all ranks meet in one all-reduce."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--no-init", action="store_true",
                        help="only print what was discovered; create no process group")
    args = parser.parse_args()
    env = discover_env()
    line = "megamoe.distributed " + " ".join(f"{k}={v}" for k, v in asdict(env).items())
    if args.no_init:
        _say(line)
        return
    import torch
    import torch.distributed as dist

    backend = init_distributed(env)
    ranks = torch.ones(1, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(ranks)
    _say(f"{line} backend={backend} allreduce_world={int(ranks.item())}")
    dist.destroy_process_group()


def _say(line: str) -> None:
    """One write per line, so that the lines of ranks sharing a pipe do not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as megamoe.train does: no finalization of gloo threads DeepSpeed keeps alive
