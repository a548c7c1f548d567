# trainer run with wall-clock intervals between train_step entries (the whole loop iteration)
import statistics, sys, time
import megamoe, megamoe.train.loop as L
L.Trainer.save = lambda self: None
entries, durs = [], []
ts = L.Trainer.train_step
def wrapped(self):
    entries.append(time.perf_counter()); r = ts(self); durs.append(time.perf_counter() - entries[-1]); return r
L.Trainer.train_step = wrapped
from megamoe.train.__main__ import main
rc = main(sys.argv[1:])
iv = [b - a for a, b in zip(entries[5:], entries[6:])]
print(f"WALL {megamoe.__file__}: median iteration {1e3 * statistics.median(iv):.2f} ms, median train_step "
      f"{1e3 * statistics.median(durs[6:]):.2f} ms", flush=True)
sys.exit(rc)
