"""`train.profile_steps: [first, last]`: the PyTorch profiler over those steps of a run, on `train.profile_ranks`.

Each profiled rank writes `run.dir/profile/steps{first}-{last}/rank{r}.trace.json` (a Chrome trace: open it in
https://ui.perfetto.dev or chrome://tracing; each step a `megamoe step N` range) and `rank{r}.txt` (the operators and
kernels by their own device time, CPU time on CPU (named ranges left out), and the device's peak memory), headed
by each step's time split into its phases (forward, backward, optimizer, the rest; CUDA events on a GPU, the
host's clock on a CPU), and the step before the window's too, timed without the profiler (whose recording slows
the host). The window's first step is launched with nothing of the step before it still queued and its last step
is read before the next is launched (the trainer does not overlap reads at its edges, on every rank alike), so the
trace holds those steps whole, and an evaluation or a save at a step inside the window (as `megamoe eval` /
`megamoe save` ranges). Other steps run as without it.
"""

import contextlib
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler_util import EventList
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    def __init__(self, steps: list[int] | None, ranks: list[int], rank: int, run_dir: Path, device: torch.device,
                 resume_step: int):
        self.first, self.last = steps if steps else (None, None)
        self.on = steps is not None and rank in ranks and resume_step < self.first
        self.rank, self.device = rank, device
        self.dir = Path(run_dir) / "profile" / f"steps{self.first}-{self.last}"
        self.prof: profile | None = None
        self.marks: list[tuple[int, list]] = []  # per timed step: (phase ended, CUDA event or host time)
        self.timing = False  # launching a timed step (the window's, or the one before it)
        self.missed = steps is not None and resume_step >= self.first  # the run resumed past the window's start

    def edge(self, step: int) -> bool:
        """Whether `step` is the one before the window or its last: the trainer reads it before the next launch."""
        return self.first is not None and step in (self.first - 1, self.last)

    @contextlib.contextmanager
    def launching(self, step: int):
        """Context for the launch of step `step` (its number once taken): starts the profiler at the window's
        first step, names each profiled step's range in the trace and marks where its launch starts and ends."""
        if not self.on or not self.first - 1 <= step <= self.last or step < 1:
            yield
            return
        if step >= self.first and self.prof is None:  # the window's first step (the one before it: no profiler)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.peak_before = torch.cuda.max_memory_allocated(self.device)
            self.prof = profile(activities=activities, record_shapes=True, acc_events=True)  # one cycle: no warning
            self.prof.__enter__()
        self.marks.append((step, [("start", self._now())]))
        self.timing = True
        try:
            with record_function(f"megamoe step {step}") if step >= self.first else contextlib.nullcontext():
                yield
            self.mark("the rest")
        finally:
            self.timing = False

    def mark(self, phase: str) -> None:
        """Inside a timed step's launch: the phase named ends here (in the device's queue on a GPU)."""
        if self.timing:
            self.marks[-1][1].append((phase, self._now()))

    def _now(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.device.type == "cuda" else 1000 * (b - a)

    def phases(self) -> list[str]:
        """Each timed step's time and its phases' (summed over micro-batches), in order of first appearance;
        on a GPU also the device's wait for the host between one step and the next (the host was late). The
        step before the window is timed too, without the profiler, whose recording slows the host: where the
        host is what the device waits for, the profiled steps' phases run longer than they do unprofiled."""
        lines, previous_end = [], None
        for step, marks in self.marks:
            spent = defaultdict(float)
            for (_, a), (phase, b) in zip(marks, marks[1:]):
                spent[phase] += self._ms(a, b)
            total = self._ms(marks[0][1], marks[-1][1])
            line = (f"step {step}{' (before the window, not profiled)' if step < self.first else ''}: {total:.2f} ms: "
                    + ", ".join(f"{phase} {ms:.2f}" for phase, ms in spent.items()))
            if previous_end is not None and self.device.type == "cuda":
                line += f"; the device waited {max(self._ms(previous_end, marks[0][1]), 0.0):.2f} ms for it"
            lines.append(line)
            previous_end = marks[-1][1]
        return lines

    def read(self, step: int) -> Path | None:
        """After step `step` was read: at the window's last step, stops the profiler and writes its files;
        returns their folder then."""
        if self.prof is None or step != self.last:
            return None
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / f"rank{self.rank}.trace.json"))
        sort = "self_device_time_total" if cuda else "self_cpu_time_total"
        steps = self.last - self.first + 1
        head = [f"megamoe profile: steps {self.first}-{self.last} ({steps} step{'s' * (steps > 1)}), rank {self.rank}, "
                f"{self.device}; operators by their own {'device' if cuda else 'CPU'} time (all steps together)"]
        if cuda:  # the allocator's peak is the process's (metrics' max_memory_gib): not reset here
            peak = torch.cuda.max_memory_allocated(self.device)
            head.append(f"peak memory allocated: {peak / 2**30:.2f} GiB"
                        + (" (reached in the window)" if peak > self.peak_before else " (reached before the window)"))
        head += ["", "each step's time (the device's, between CUDA events queued with its work)" if cuda
                 else "each step's time (the host's clock)", *self.phases()]
        self.marks = []
        # the operators and kernels alone: named ranges (steps, compiled graphs' calls, Optimizer.step) would
        # count their contents again (the phases above say where each step's time goes)
        ops = EventList([e for e in prof.key_averages() if not e.is_user_annotation])
        table = ops.table(sort_by=sort, row_limit=60, max_name_column_width=80)
        (self.dir / f"rank{self.rank}.txt").write_text("\n".join(head) + "\n\n" + table + "\n")
        return self.dir

    def close(self) -> None:
        """The run ends inside the window (preemption, an error): stop the profiler, writing nothing."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
