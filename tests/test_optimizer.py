"""megamoe's AdamW (ZeRO 0): torch's AdamW arithmetic, fp32 masters for bf16 weights, clipping by
the global norm, and the divergence guard (a non-finite step changes nothing; too many stop the run)."""

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from megamoe.checkpoint.io import latest_checkpoint
from megamoe.train.fused_adamw import adamw_step
from megamoe.train.optimizer import AdamW
from pip_cache import run_interpreted
from runs import REPO, TINY, free_port, metrics

ONE_RANK = SimpleNamespace(tp=1, ep=1, pp=1)
HYPER = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8)


def _params(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g).to(dtype)) for shape in [(7, 5), (13,), (3, 4, 6)]]


def _grads(seed):
    g = torch.Generator().manual_seed(100 + seed)
    return [torch.randn(shape, generator=g) for shape in [(7, 5), (13,), (3, 4, 6)]]


def test_fused_update_is_torch_adamw():
    """The torch form of the fused update equals torch.optim.AdamW bit for bit, step after step."""
    ours, ref = _params(), _params()
    state = [[torch.zeros_like(p), torch.zeros_like(p)] for p in ours]
    torch_opt = torch.optim.AdamW(ref, weight_decay=0.1, foreach=False, **HYPER)
    for step in range(1, 6):
        for p, q, g, moments in zip(ours, ref, _grads(step), state):
            q.grad = g.clone()
            with torch.no_grad():
                adamw_step(p, g, None, *moments, lr=HYPER["lr"], beta1=0.9, beta2=0.95,
                           eps=1e-8, weight_decay=0.1, step=step)
        torch_opt.step()
        for p, q in zip(ours, ref):
            assert torch.equal(p, q), step


def test_clipping_scales_the_gradient_by_the_global_norm():
    """max_norm clips like torch.nn.utils.clip_grad_norm_ followed by AdamW."""
    ours, ref = _params(), _params()
    opt = AdamW([{"params": ours, "weight_decay": 0.0}], ONE_RANK, max_norm=0.5, **HYPER)
    torch_opt = torch.optim.AdamW(ref, weight_decay=0.0, foreach=False, **HYPER)
    for step in range(1, 4):
        for p, q, g in zip(ours, ref, _grads(step)):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        norm = torch.nn.utils.clip_grad_norm_(ref, 0.5)
        torch_opt.step()
        assert opt._global_grad_norm == pytest.approx(float(norm), rel=1e-6)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bf16_weights_follow_their_fp32_masters():
    """bf16 weights are their fp32 masters rounded; the masters take the fp32 run's path given
    the same (bf16-representable) gradients."""
    fp32 = _params()
    bf16 = [torch.nn.Parameter(p.detach().clone()) for p in fp32]
    opt32 = AdamW([{"params": fp32, "weight_decay": 0.1}], ONE_RANK, max_norm=0.0, **HYPER)
    opt16 = AdamW([{"params": bf16, "weight_decay": 0.1}], ONE_RANK, max_norm=0.0, master_weights=True, **HYPER)
    for p in bf16:  # masters are taken from the fp32 init, before the cast (as build_engine does)
        p.data = p.data.bfloat16()
    for step in range(1, 5):
        for p, q, g in zip(fp32, bf16, _grads(step)):
            g = g.bfloat16()
            p.grad, q.grad = g.float(), g
        opt32.step()
        opt16.step()
    for p, q in zip(fp32, bf16):
        assert q.dtype == torch.bfloat16
        torch.testing.assert_close(opt16.master(q), p, rtol=1e-6, atol=1e-7)
        assert torch.equal(q, opt16.master(q).bfloat16())
    assert opt16.steps_taken() == 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_optimizer_steps_like_the_in_place_one(monkeypatch, dtype):
    """optim.offload=cpu: masters and moments live on the host, parameters stream through in chunks
    (here a few elements, so every parameter spans several, the last one partial); the result is
    the in-place optimizer's within one rounding of torch's fused CPU kernel."""
    from megamoe.train import offload
    monkeypatch.setattr(offload, "CHUNK", 16)
    inplace, host = _params(), _params()
    opts = [AdamW([{"params": ps, "weight_decay": 0.1}], ONE_RANK, max_norm=0.5, offload=off,
                  master_weights=dtype != torch.float32, **HYPER) for ps, off in ((inplace, False), (host, True))]
    for p, q in zip(inplace, host):
        p.data, q.data = p.data.to(dtype), q.data.to(dtype)
    for step in range(1, 5):
        for p, q, g in zip(inplace, host, _grads(step)):
            p.grad, q.grad = g.to(dtype), g.to(dtype)
        for opt in opts:
            opt.step()
        assert opts[0]._global_grad_norm == opts[1]._global_grad_norm
    for p, q in zip(inplace, host):
        assert opts[1].master(q).device.type == "cpu" and opts[1].state[q]["exp_avg"].device.type == "cpu"
        torch.testing.assert_close(opts[1].master(q), opts[0].master(p), rtol=1e-6, atol=1e-7)
        for k in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opts[1].state[q][k], opts[0].state[p][k], rtol=1e-6, atol=1e-12)
        assert torch.equal(q, opts[1].master(q).to(dtype))
    assert opts[1].steps_taken() == 4


def test_offloaded_state_is_checkpointed_where_it_lives():
    """A save snapshots host tensors by cloning them, unless they are the host-offloaded optimizer's
    (then the save waits for the write): OLMoE-1B-7B's 83 GB of host state is not doubled."""
    from megamoe.checkpoint.io import _HostCopies
    t = torch.randn(4, 3)
    assert _HostCopies(in_place=True)("k", t).data_ptr() == t.data_ptr()
    assert _HostCopies()("k", t).data_ptr() != t.data_ptr()


@pytest.mark.parametrize("poison", ["grad_nan", "grad_inf", "loss_nan"])
def test_non_finite_step_changes_nothing(poison):
    params = _params(torch.bfloat16)
    opt = AdamW([{"params": params, "weight_decay": 0.1}], ONE_RANK, max_norm=1.0, master_weights=True, **HYPER)
    for p, g in zip(params, _grads(1)):
        p.grad = g.bfloat16()
    opt.step()
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} | {"w": p.detach().clone()} for p in params}
    for p, g in zip(params, _grads(2)):
        p.grad = g.bfloat16()
    if poison == "grad_nan":
        params[1].grad[3] = float("nan")
    elif poison == "grad_inf":
        params[2].grad[0, 0, 0] = float("inf")
    else:
        opt.also_finite = torch.tensor(float("nan"))
    opt.step()
    assert opt.overflow
    for p in params:
        after = {k: v for k, v in opt.state[p].items()} | {"w": p.detach()}
        assert all(torch.equal(after[k], before[id(p)][k]) for k in after)
    for p, g in zip(params, _grads(2)):
        p.grad = g.bfloat16()
    opt.step()  # the same gradients, finite this time: the step is taken
    assert not opt.overflow and opt.steps_taken() == 2
    assert not torch.equal(params[0], before[id(params[0])]["w"])


NAN_AT = """
import sys, torch
import megamoe.train.loop as loop
from megamoe.train.__main__ import main
first, last, rank = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
step = [0]
launch = loop.Trainer._launch_step
def counted(self, *args, **kwargs):
    step[0] = self.step + 1  # the step being queued (as logged)
    return launch(self, *args, **kwargs)
loop.Trainer._launch_step = counted
lm_loss = loop.Trainer._lm_loss
def poisoned(self, *args, **kwargs):
    loss = lm_loss(self, *args, **kwargs)
    import torch.distributed as dist
    if (self.model.training and first <= step[0] <= last
            and (not dist.is_initialized() or dist.get_rank() == rank)):
        loss = loss + loss.detach() * float("nan")  # a non-finite loss; its gradients stay finite
    return loss
loop.Trainer._lm_loss = poisoned
sys.exit(main(sys.argv[4:]))
"""


def _launch_poisoned(tmp_path, run, nproc, first, last, overrides):
    script = tmp_path / "poison.py"
    script.write_text(NAN_AT)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                                      f"--master_port={free_port()}"]
    cmd = [sys.executable, *launcher, str(script), str(first), str(last), str(nproc - 1), *TINY, *overrides,
           f"run.dir={run}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def _checkpoint(run, step):
    d = run / "checkpoints" / f"step_{step:08d}"
    return {**load_file(d / "model-rank00000.safetensors"), **load_file(d / "optim-rank00000.safetensors")}


def test_a_nan_step_on_one_rank_is_skipped_by_every_rank_and_the_run_goes_on(tmp_path):
    """NaN loss on data-parallel rank 1 at step 3: both ranks skip it (weights and Adam moments of
    step 3 equal step 2's bit for bit), it is counted, and steps 4-5 train on."""
    run = tmp_path / "run"
    proc = _launch_poisoned(tmp_path, run, 2, 3, 3, ["train.steps=5", "train.save_interval=1",
                                                     "train.keep_checkpoints=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3 skipped" in proc.stdout
    records = {r["step"]: r for r in metrics(run)}
    assert [records[s]["skipped_steps"] for s in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(records[3]["loss"]) and all(math.isfinite(records[s]["loss"]) for s in (4, 5))
    two, three, four = (_checkpoint(run, s) for s in (2, 3, 4))
    assert all(torch.equal(three[k], two[k]) for k in two)
    assert not all(torch.equal(four[k], three[k]) for k in three)


def test_a_nan_loss_on_the_last_pipeline_stage_skips_the_step_on_every_stage(tmp_path):
    """PP2: the loss exists on the last stage only, and its gradients are finite here; the step
    is still skipped by both stages (weights and moments of step 3 equal step 2's)."""
    run = tmp_path / "run"
    proc = _launch_poisoned(tmp_path, run, 2, 3, 3, ["parallel.pipeline=2", "train.steps=4",
                                                     "train.save_interval=1", "train.keep_checkpoints=10"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3 skipped" in proc.stdout
    assert [r["skipped_steps"] for r in metrics(run)] == [0, 0, 1, 1]
    two, three = (_checkpoint(run, s) for s in (2, 3))
    assert all(torch.equal(three[k], two[k]) for k in two)


@pytest.mark.parametrize("extra", [[], ["moe.bias_update_rate=0.01"],  # aux-loss-free: biases move on the device
                                   ["parallel.pipeline=2", "moe.bias_update_rate=0.01"]])
def test_reading_each_step_after_the_next_is_queued_changes_nothing(tmp_path, extra):
    """train.overlap_read (the default) against reading every step before the next: two ranks (data-
    parallel, or two pipeline stages), a NaN loss on rank 1 in a step read late (2), evaluations and
    saves between: the same metrics and the same checkpoints (every rank's files), bit for bit."""
    runs = {}
    for overlap in ("true", "false"):
        runs[overlap] = run = tmp_path / overlap
        proc = _launch_poisoned(tmp_path, run, 2, 2, 2, ["train.steps=7", "train.save_interval=3",
                                                         "train.eval_interval=4", "train.keep_checkpoints=10",
                                                         f"train.overlap_read={overlap}", *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "step 2 skipped" in proc.stdout
    timing = {"tokens_per_sec", "step_time_ms", "tflops_per_rank", "mfu"}
    a, b = ([{k: v for k, v in r.items() if k not in timing} for r in metrics(runs[o])] for o in ("true", "false"))
    assert [r["step"] for r in a] == list(range(1, 8)) and [r["skipped_steps"] for r in a] == [0] + [1] * 6
    assert "eval_loss" in a[3] and json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    if extra:  # the biases moved (the step-2 one, skipped, did not move them: the host path's order)
        assert a[0]["bias_spread"][0] > 0
    for step in (3, 6, 7):
        files = sorted((runs["true"] / "checkpoints" / f"step_{step:08d}").glob("*.safetensors"))
        assert len(files) >= 2, files
        for f in files:
            x, y = load_file(f), load_file(runs["false"] / "checkpoints" / f"step_{step:08d}" / f.name)
            if f.name.startswith("rng-"):  # python's and numpy's generators are not seeded: they differ run to run
                x, y = {"torch": x["torch"]}, {"torch": y["torch"]}
            assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in y), (step, f.name)


@pytest.mark.parametrize("save_interval", [1, 4])  # 4: most steps are read after the next is queued
def test_a_diverged_run_stops_with_an_error_and_finite_checkpoints(tmp_path, save_interval):
    run = tmp_path / "run"
    proc = _launch_poisoned(tmp_path, run, 1, 3, 100, ["train.steps=8", f"train.save_interval={save_interval}",
                                                       "train.max_skipped_steps=3"])
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "megamoe: error: 3 steps in a row" in proc.stderr and "optim.lr" in proc.stderr
    assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]  # the fifth raised before its record
    weights = _checkpoint(run, int(latest_checkpoint(run / "checkpoints").name[5:]))
    assert all(torch.isfinite(t).all() for t in weights.values())


INTERPRETED = """
import math, sys, torch
from megamoe.train import fused_adamw as F
assert F.triton is not None
worst = {}
for dtype in (torch.float32, torch.bfloat16):
    n, w = 10_007, torch.randn(10_007, generator=torch.Generator().manual_seed(0))  # n: not a block multiple
    runs = []
    for kernel in (True, False):
        p = w.to(dtype).clone()
        master = w.clone() if dtype != torch.float32 else None
        m, v = torch.zeros(n), torch.zeros(n)
        for step in range(1, 5):  # step 4 is skipped (enabled 0): it must change nothing
            g = torch.randn(n, generator=torch.Generator().manual_seed(step)).to(dtype)
            scale, enabled = torch.tensor(0.7), torch.tensor(float(step < 4))
            if kernel:
                F._launch(p, g, master, m, v, 1e-3, 0.9, 0.95, 1e-8, 0.1, 1 - 0.9**step, math.sqrt(1 - 0.95**step),
                          scale, enabled)
            else:
                F.adamw_step(p, g, master, m, v, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
                             step=step, grad_scale=0.7 if step % 2 else scale, enabled=enabled)
        runs.append([(master if master is not None else p).clone(), m, v, p.float()])
    (a, b) = runs
    worst[str(dtype)] = [float(((x - y).norm() / y.norm())) for x, y in zip(a[:3], b[:3])]
    # The kernel's weight is its own master rounded to the weight's dtype: to nearest even on a GPU
    # (bench/bench_optimizer.py), toward zero in the interpreter (numpy's conversion).
    toward_zero = (a[0].view(torch.int32) & ~0xFFFF).view(torch.float32) if dtype != torch.float32 else a[0]
    worst[str(dtype)].append(bool(torch.equal(a[3], toward_zero.to(dtype).float())))
print(worst)
"""


def test_the_triton_kernel_computes_the_torch_form(tmp_path):
    """The CUDA kernel itself, run by Triton's interpreter on the CPU: masters and moments equal the
    torch form to fp32 rounding (a skipped step, enabled = 0, changing nothing in either), and the
    weight is the kernel's master in the weight's dtype."""
    worst = run_interpreted(INTERPRETED)
    for dtype, (master, m, v, weight_is_master_rounded) in worst.items():
        assert max(master, m, v) < 1e-6 and weight_is_master_rounded, (dtype, worst)


def test_deferred_reads_take_the_same_steps_and_settle_a_skipped_one():
    """defer_reads (what the trainer runs): the update is launched with the clipping factor and
    the finite flag as device scalars, before anything is read; the step's outcome (norm, skip),
    asked for at once or after the next step() settled it, and the weights, masters, moments and
    step counters equal the optimizer that read first, a non-finite step (3) included."""
    now, later = _params(), _params()
    opts = [AdamW([{"params": ps, "weight_decay": 0.1}], ONE_RANK, max_norm=0.5, master_weights=True, **HYPER)
            for ps in (now, later)]
    opts[1].defer_reads = True
    for p, q in zip(now, later):
        p.data, q.data = p.data.bfloat16(), q.data.bfloat16()
    outcomes = []
    for step in range(1, 7):
        for p, q, g in zip(now, later, _grads(step)):
            p.grad, q.grad = g.bfloat16(), g.bfloat16()
        if step == 3:
            now[1].grad[2] = later[1].grad[2] = float("inf")
        opts[0].step()
        outcomes.append((opts[0]._global_grad_norm, opts[0].overflow, opts[0].steps_taken()))
        opts[1].step()  # settles step - 1 if it was left pending
        assert opts[1]._pending is not None and opts[1].steps_launched == step
        if step % 2 == 0:  # even steps: their outcome is asked for after the next step()
            continue
        if step > 1:
            assert opts[1].outcome(step - 1) == outcomes[-2][:2]  # settled by this step()
        assert opts[1].outcome(step) == opts[1].outcome(step)  # odd steps: at once (settled once)
        norm, skipped = opts[1].outcome(step)
        want_norm, want_skipped, want_taken = outcomes[-1]
        assert skipped == want_skipped == (step == 3) == opts[1].overflow
        assert norm == want_norm or (math.isinf(norm) and step == 3)
        assert opts[1].steps_taken() == want_taken == step - (step >= 3)
        for p, q in zip(now, later):
            assert torch.equal(p, q) and torch.equal(opts[0].master(p), opts[1].master(q))
            assert all(torch.equal(opts[0].state[p][k], opts[1].state[q][k]) for k in ("exp_avg", "exp_avg_sq"))


SYNCS = """
import sys
from deepspeed.accelerator import get_accelerator
import megamoe.train.loop as loop
from megamoe.train.optimizer import AdamW
from megamoe.train.__main__ import main
acc, syncs, order = get_accelerator(), [], []
sync, settle, launch, finish = acc.synchronize, AdamW.settle, loop.Trainer._launch_step, loop.Trainer._finish_step
acc.synchronize = lambda *a, **k: (syncs.append(1), sync(*a, **k))[1]
AdamW.settle = lambda self: (order.append("S:" + sys._getframe(1).f_code.co_name), settle(self))[1]
loop.Trainer._launch_step = lambda self, *a: (order.append(f"L{self.step + 1}"), launch(self, *a))[1]
loop.Trainer._finish_step = lambda self, done: (order.append(f"R{done.step}"), finish(self, done))[1]
code = main(sys.argv[1:])
print("SYNCS", len(syncs), " ".join(order))
sys.exit(code)
"""


@pytest.mark.parametrize("overrides, order", [
    # each step is read once the next is queued; the optimizer's outcome of a step arrives behind its
    # update and is settled by the next step (S:step), the last one's when the trainer reads it
    ([], "L1 L2 S:step R1 L3 S:step R2 L4 S:step R3 L5 S:step R4 R5 S:outcome"),
    # aux-loss-free balancing too: the biases move on the device, before the next step's routing
    (["moe.bias_update_rate=0.01"], "L1 L2 S:step R1 L3 S:step R2 L4 S:step R3 L5 S:step R4 R5 S:outcome"),
    # a step that saves is read before the next is queued
    (["train.save_interval=3"], "L1 L2 S:step R1 L3 S:step R2 R3 S:outcome L4 L5 S:step R4 R5 S:outcome"),
    (["train.overlap_read=false"], "L1 R1 S:outcome L2 R2 S:outcome L3 R3 S:outcome L4 R4 S:outcome L5 R5 S:outcome"),
])
def test_a_training_step_is_read_after_the_next_is_queued_and_never_synchronises(tmp_path, overrides, order):
    """No device-wide synchronisation in the loop (DeepSpeed's throughput timer would add two per
    micro-batch); each step's statistics and the optimizer's norm and skip flag are read after the
    next step is queued (their copies to the host wait for nothing queued after them), except where
    the step's state is needed first (a save, the end), and always with train.overlap_read=false."""
    script = tmp_path / "syncs.py"
    script.write_text(SYNCS)
    cmd = [sys.executable, str(script), *TINY, "train.steps=5", *overrides, f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SYNCS"))
    assert line == f"SYNCS 0 {order}", line


GC = """
import gc, sys
import megamoe.train.loop as loop
calls, enabled = [], []
collect = gc.collect
def recording(generation=2):
    calls.append((trainer_step[0], generation))
    return collect(generation)
gc.collect = recording
trainer_step = [None]
launch = loop.Trainer._launch_step
def watched(self, *args, **kwargs):
    trainer_step[0] = self.step + 1
    enabled.append(gc.isenabled())
    return launch(self, *args, **kwargs)
loop.Trainer._launch_step = watched
from megamoe.train.__main__ import main
rc = main(sys.argv[1:])
print("GC", repr((rc, calls, enabled, gc.isenabled())))
"""


@pytest.mark.parametrize("interval", [2, 0])
def test_the_loop_collects_garbage_at_its_own_steps(tmp_path, interval):
    """train.gc_interval N: Python's automatic collector is off during the loop (and on again after
    it); the young objects are collected in every N-th step, everything beside a save or an
    evaluation. 0 leaves Python's collector as it is and collects nothing itself."""
    script = tmp_path / "gc_steps.py"
    script.write_text(GC)
    cmd = [sys.executable, str(script), *TINY, "train.steps=5", "train.save_interval=3", "train.eval_interval=100",
           f"train.gc_interval={interval}", f"run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rc, calls, enabled, after = eval(next(x for x in proc.stdout.splitlines() if x.startswith("GC "))[3:])
    assert rc == 0 and after is True
    if interval:
        # before the loop (step None), in steps 2 and 4, beside the saves of steps 3 and 5 (5: also the last eval)
        assert calls == [(None, 2), (2, 1), (3, 2), (4, 1), (5, 2)], calls
        assert enabled == [False] * 5
    else:
        assert [c for c in calls if c[0] is not None] == [] and enabled == [True] * 5
