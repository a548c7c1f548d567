# trainer run (saves off): host time of each step's launch, a cProfile of steps 11-20's launches and
# reads, and (SYNC_DEBUG=1) every synchronising CUDA call from step 24 on, with its stack
import cProfile, io, os, pstats, statistics, sys, time, traceback, warnings
import torch
import megamoe.train.loop as L
L.Trainer.save = lambda self: None
launch, finish = L.Trainer._launch_step, L.Trainer._finish_step
durs, reads, prof, syncs = {}, [], cProfile.Profile(), []
def timed_launch(self, *a):
    step = self.step + 1
    if step == 11: prof.enable()
    if step == 24 and os.environ.get("SYNC_DEBUG"): torch.cuda.set_sync_debug_mode("warn")
    t0 = time.perf_counter(); out = launch(self, *a); durs[step] = time.perf_counter() - t0
    return out
def timed_finish(self, done):
    out = finish(self, done); reads.append((done.step, time.perf_counter()))
    if done.step == 20: prof.disable()
    return out
L.Trainer._launch_step, L.Trainer._finish_step = timed_launch, timed_finish
def show(message, category, filename, lineno, file=None, line=None):
    if len(syncs) < 12:
        syncs.append(f"{message}\n" + "".join(traceback.format_stack(limit=14)[:-1]))
warnings.showwarning = show
from megamoe.train.__main__ import main
rc = main(sys.argv[1:])
torch.cuda.set_sync_debug_mode(0)
t = [b for s, b in reads if s >= 5]
iv = [y - x for x, y in zip(t, t[1:])]
print(f"WALL median read-to-read {1e3 * statistics.median(iv):.2f} ms; median launch (host) "
      f"{1e3 * statistics.median(v for k, v in durs.items() if 5 < k < 11 or 20 < k < 24):.2f} ms", flush=True)
s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(35)
s2 = io.StringIO(); pstats.Stats(prof, stream=s2).sort_stats("cumulative").print_stats(45)
open(os.path.join(os.environ["OUT"], os.environ.get("TAG", "x") + "_cprofile.txt"), "w").write(s.getvalue() + s2.getvalue())
print(f"SYNCS {len(syncs)}"); print("\n".join(syncs[:6]))
sys.exit(rc)
