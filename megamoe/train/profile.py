"""`train.profile_steps: [first, last]`: the PyTorch profiler over those steps of a run, on `train.profile_ranks`.

Each profiled rank writes `run.dir/profile/steps{first}-{last}/rank{r}.trace.json` (a Chrome trace: open it in
https://ui.perfetto.dev or chrome://tracing; each step a `megamoe step N` range) and `rank{r}.txt` (the operators and
kernels by their own device time, CPU time on CPU, and the device's peak memory). The window's
first step is launched with nothing of the step before it still queued and its last step is read before the next
is launched (the trainer does not overlap reads at its edges, on every rank alike), so the trace holds those
steps whole, and an evaluation or a save at a step inside the window (as `megamoe eval` / `megamoe save`
ranges, counted in the table too). Other steps run as without it.
"""

import contextlib
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function


class StepProfiler:
    def __init__(self, steps: list[int] | None, ranks: list[int], rank: int, run_dir: Path, device: torch.device,
                 resume_step: int):
        self.first, self.last = steps if steps else (None, None)
        self.on = steps is not None and rank in ranks and resume_step < self.first
        self.rank, self.device = rank, device
        self.dir = Path(run_dir) / "profile" / f"steps{self.first}-{self.last}"
        self.prof: profile | None = None
        self.missed = steps is not None and resume_step >= self.first  # the run resumed past the window's start

    def edge(self, step: int) -> bool:
        """Whether `step` is the one before the window or its last: the trainer reads it before the next launch."""
        return self.first is not None and step in (self.first - 1, self.last)

    def launching(self, step: int):
        """Context for the launch of step `step` (its number once taken): starts the profiler at the window's
        first step and names each profiled step's range in the trace."""
        if not self.on or not self.first <= step <= self.last:
            return contextlib.nullcontext()
        if self.prof is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                self.peak_before = torch.cuda.max_memory_allocated(self.device)
            self.prof = profile(activities=activities, record_shapes=True)
            self.prof.__enter__()
        return record_function(f"megamoe step {step}")

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
        table = prof.key_averages().table(sort_by=sort, row_limit=60, max_name_column_width=80)
        (self.dir / f"rank{self.rank}.txt").write_text("\n".join(head) + "\n\n" + table + "\n")
        return self.dir

    def close(self) -> None:
        """The run ends inside the window (preemption, an error): stop the profiler, writing nothing."""
        if self.prof is not None:
            prof, self.prof = self.prof, None
            prof.__exit__(None, None, None)
