# trainer run with checkpoint writing off: median host time between consecutive step reads, of each
# step's launch and read (host), and (SYNC_DEBUG=1) the synchronising CUDA calls from step 24 on
import os, statistics, sys, time, traceback, warnings
import torch
import megamoe.train.loop as L
from megamoe.moe import grouped_gemm as G
G.CUT_LARGE_EXPERTS = os.environ.get("CUT", "1") == "1"
L.Trainer.save = lambda self: None
reads, launches, finishes, syncs = [], {}, {}, []
launch, finish = L.Trainer._launch_step, L.Trainer._finish_step
def timed_launch(self, *a):
    step = self.step + 1
    if step == 24 and os.environ.get("SYNC_DEBUG"):
        torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter(); out = launch(self, *a); launches[step] = time.perf_counter() - t0
    return out
def timed_finish(self, done):
    t0 = time.perf_counter(); out = finish(self, done); t1 = time.perf_counter()
    finishes[done.step] = t1 - t0; reads.append((done.step, t1))
    return out
L.Trainer._launch_step, L.Trainer._finish_step = timed_launch, timed_finish
def show(message, category, filename, lineno, file=None, line=None):
    if "synchronizing" in str(message) and len(syncs) < 8:
        ours = [f for f in traceback.extract_stack()[:-1] if "megamoe" in f.filename or "deepspeed" in f.filename]
        syncs.append(" < ".join(f"{os.path.basename(f.filename)}:{f.lineno} {f.name}" for f in ours[::-1][:5]))
warnings.showwarning = show
from megamoe.train.__main__ import main
rc = main(sys.argv[1:])
torch.cuda.set_sync_debug_mode(0)
t = [b for s, b in reads if s >= 5]
iv = [y - x for x, y in zip(t, t[1:])]
mid = lambda d: 1e3 * statistics.median(v for k, v in d.items() if 5 < k < 24)
print(f"WALL median read-to-read {1e3 * statistics.median(iv):.2f} ms (steps 6-{reads[-1][0]}); host: launch "
      f"{mid(launches):.2f} ms, read {mid(finishes):.2f} ms (steps 6-23)", flush=True)
for s in syncs:
    print("SYNC", s)
sys.exit(rc)
