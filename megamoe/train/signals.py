"""Preemption: turn SIGUSR1/SIGTERM into "stop after this step" that every rank agrees on.

Slurm sends SIGUSR1 before the time limit (`--signal=USR1@120`) and SIGTERM on preemption
or `scancel`. The handler only records the signal. The training loop sends each rank's flag
(`received`) with every step's statistics, reduced with MAX over all ranks and read with them
(no read of its own, so it does not wait for the step queued after), saves a checkpoint after
the step that says so and exits with `EXIT_REQUEUE`, which slurm/train.sbatch answers with
`scontrol requeue`. `should_stop()` is the same agreement as one collective of its own.
"""

import signal

import torch
import torch.distributed as dist

from ..parallel.comm import all_reduce

# EX_TEMPFAIL from sysexits.h: "try again later". The launch scripts requeue on it.
EXIT_REQUEUE = 75
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    """Context manager: records the preemption signals this process receives.

    with PreemptionHandler() as preempt:
        for step in ...:
            train_step()
            if preempt.should_stop():
                save_checkpoint(); sys.exit(EXIT_REQUEUE)

    The signal does not interrupt the step in flight. Handlers in place before `with` are
    restored on exit.
    """

    def __init__(self, signals=PREEMPTION_SIGNALS):
        self.signals = tuple(signals)
        self.received: signal.Signals | None = None  # the first preemption signal seen
        self._previous: dict = {}

    def __enter__(self) -> "PreemptionHandler":
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received = signal.Signals(signum)

    def should_stop(self, group=None) -> bool:
        """True on every rank of `group` once any of them received a preemption signal.

        A collective (all-reduce MAX of one flag) when a process group exists: call it on
        every rank at the same point of the step, so that all ranks stop on the same step.
        """
        local = self.received is not None
        if not (dist.is_available() and dist.is_initialized()):
            return local
        flag = torch.tensor([int(local)], dtype=torch.int32)
        return bool(all_reduce(flag, group, op=dist.ReduceOp.MAX).item())
