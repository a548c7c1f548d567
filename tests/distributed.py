"""Run a function on N real gloo ranks and collect what each returns.

    results = run_ranks(fn, 4, cfg)   # fn(rank, world_size, cfg) in 4 processes

`fn` must be importable by name (a module-level function of a test module). Ranks fork from
a server process that imported torch once, so a run costs about a second; they inherit the
environment and sys.path that the server started with (at the first call). Each rank gets
MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE, one CPU thread and an initialised gloo process
group. Results come back pickled, in rank order. An exception in any rank fails the caller
with that rank's traceback; a rank that hangs (say, in a collective its peer never reached)
fails it after `timeout` seconds. Either way every rank is stopped.
"""

import os
import pickle
import queue
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


class RankFailed(AssertionError):
    """A rank raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        results.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - everything goes back to the test process
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(fn, world_size: int, *args, timeout: float = 120.0) -> list:
    """fn(rank, world_size, *args) on `world_size` gloo ranks -> [result of rank 0, 1, ...]."""
    ctx = mp.get_context("forkserver")  # one server imports torch once; ranks fork from it
    ctx.set_forkserver_preload(["torch", "torch.distributed", "megamoe.model.olmoe"])
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    done: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(done) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.2)
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if r not in done and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                if time.monotonic() > deadline:
                    missing = [r for r in range(world_size) if r not in done]
                    raise RankFailed(f"ranks {missing} did not finish within {timeout:.0f}s")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            done[rank] = pickle.loads(payload)
    finally:
        for p in procs:
            p.join(timeout=5 if len(done) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    return [done[r] for r in range(world_size)]
