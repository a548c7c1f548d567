"""`python -m megamoe.train --config tiny-cpu key=value ...` (or `megamoe-train`): the one entry point.

Every launcher (deepspeed, torchrun, mpirun, srun) starts this module on each rank.
"""

import argparse
import os
import sys
import time
import traceback
import warnings

# Routed token counts, and so the expert buffers' sizes, change every step: without expandable
# segments the CUDA allocator fragments (9 OLMoE layers fit one H100 only with it). Must be set
# before torch initialises CUDA; a user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
# torch warns that a barrier falls back to the current device; init_distributed made that
# device this rank's GPU (torch.cuda.set_device(local_rank)), which is the right one.
warnings.filterwarnings("ignore", message=r"barrier\(\): using the device under current context")

import torch

from ..checkpoint.io import CheckpointError
from ..config import ConfigError, load_config, presets
from ..deepspeed_adapter import DeepSpeedVersionError
from ..distributed import LaunchError, collective_failure
from .loop import DivergenceError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-train", description=__doc__)
    parser.add_argument("--config", help="YAML config file, or a preset name: "
                        f"{', '.join(presets())}; defaults are OLMoE-1B-7B")
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = parser.parse_args(argv)
    start = time.monotonic()
    cfg = lock = None
    try:
        cfg = load_config(args.config, args.overrides)
        from ..moe.grouped_gemm import check_environment
        check_environment()
        from .loop import Trainer
        from .rundir import RunLock
        lock = RunLock(cfg.run.dir)  # rank 0 takes it once the process group exists
        trainer = Trainer(cfg, lock)
        code = trainer.fit()
        if code == 0 and trainer.is_logger and cfg.run.sample_prompt:
            from ..inference.generate import sample_from_checkpoint
            text = sample_from_checkpoint(trainer.run_dir, cfg.run.sample_prompt, cfg.run.sample_tokens)
            print(f"megamoe: sample from the final checkpoint:\n{cfg.run.sample_prompt}{text}", flush=True)
        if code == 0 and trainer.is_logger:
            minutes, seconds = divmod(round(time.monotonic() - start), 60)
            held = "config.yaml, metrics.jsonl, tensorboard/" if cfg.run.tensorboard else "config.yaml, metrics.jsonl"
            print(f"megamoe: done: step {trainer.step} of {cfg.train.steps} in {minutes} min {seconds} s; "
                  f"{trainer.run_dir} holds {held} and checkpoints/ (sample it with "
                  f"`megamoe-generate {trainer.run_dir} --prompt TEXT`)", flush=True)
        _shutdown(clean=True)
        return code
    except (ConfigError, LaunchError, CheckpointError, DeepSpeedVersionError, DivergenceError) as e:
        print(f"megamoe: error: {e}", file=sys.stderr, flush=True)
        _shutdown(clean=False)
        return 3 if isinstance(e, DivergenceError) else 2
    except torch.OutOfMemoryError as e:
        # the GPU ran out (the model state alone was checked at the start: activations, fragments)
        first = str(e).split(". ")[0].strip()
        fp8 = (", or quantize the FP8 weights in every call (train.fp8_weight_cache=false)"
               if cfg is not None and cfg.fp8_keys() and cfg.train.fp8_weight_cache else "")
        print(f"megamoe: error: {first} (GPU memory ran out during the run): lower train.micro_batch_size, "
              f"set parallel.activation_checkpointing=selective or full, spread the model over more GPUs "
              f"(parallel.*; `megamoe-plan --gpu-gib`) or keep the optimizer in host memory "
              f"(optim.offload=cpu){fp8}; relaunched, the run resumes from its last checkpoint", file=sys.stderr, flush=True)
        _shutdown(clean=False)
        return 1
    except RuntimeError as e:  # a collective that timed out or lost a peer: name it, on this rank
        failure = collective_failure(e, cfg and cfg.train.collective_timeout_s)
        if failure is None:
            raise
        print(f"megamoe: error: {failure}", file=sys.stderr, flush=True)
        _shutdown(clean=False)
        return 1
    finally:  # before _exit: the next job finds run.dir free, not a lock to take over
        if lock is not None:
            lock.release()


def _shutdown(clean: bool) -> None:
    """Destroy the process groups (what torch asks of every program that made them).

    For library callers of `main`; run as a module, `_exit` then ends the process. After an
    error, other ranks may still be inside a collective that destroying would wait on, so a
    multi-rank group is then left to the exit.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and (clean or dist.get_world_size() == 1):
        dist.destroy_process_group()


def _exit(code: int) -> None:
    """End the process without interpreter finalization.

    Everything the run owes is done by now: checkpoints written, metrics and tensorboard
    closed, process groups destroyed. What finalization would still do is tear down what
    other libraries keep alive. DeepSpeed and the parallel state keep references to the gloo
    process groups, so their worker threads outlive destroy_process_group (21 threads on an
    EP2 rank). Torn down during finalization, they now and then aborted a finished run with
    SIGABRT, "terminate called without an active exception": twice in CI runs of the CPU
    suite, each time one launch among its ~70 multi-rank ones.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)


def cli() -> None:
    """`python -m megamoe.train` and the `megamoe-train` command: `main`, then `_exit`."""
    try:
        exit_code = main()
    except SystemExit as e:  # argparse's usage errors and --help (already printed)
        exit_code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        exit_code = 130
    except BaseException:  # noqa: BLE001 - printed as Python would, then the same exit
        traceback.print_exc()
        exit_code = 1
    _exit(exit_code)


if __name__ == "__main__":
    cli()
