"""The statistics a step logs (`megamoe.train.stats.StepStats`): the plain and the pipeline paths
add them on the device without reading anything to the host, read them once per step, and PP2's
are the 1-rank run's."""

import sys
from collections import Counter
from contextlib import contextmanager

import pytest
import torch

from distributed import run_ranks
from megamoe.model.olmoe import OLMoE, init_weights
from megamoe.parallel import pipeline_schedule
from megamoe.parallel.pipeline import apply_pipeline
from megamoe.parallel.state import ParallelState
from megamoe.train.loss import cross_entropy
from megamoe.train.stats import HostCopy, StepStats
from test_tensor_parallel import BATCH, SEQ, micro_batches, tiny

HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")
WATCHED = ("megamoe/train/stats.py", "megamoe/parallel/pipeline_schedule.py")
GAS = 4


@contextmanager
def host_reads():
    """Counts the tensor reads to the host (`.item()`, `.tolist()`, `float(t)`, ...) made by the
    accumulator and the pipeline schedule, by method."""
    counts, originals = Counter(), {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name, method):
        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.endswith(WATCHED):
                counts[name] += 1
            return method(self, *args, **kwargs)
        return read

    for name, method in originals.items():
        setattr(torch.Tensor, name, counted(name, method))
    try:
        yield counts
    finally:
        for name, method in originals.items():
            setattr(torch.Tensor, name, method)


class Engine:
    """What the schedule uses of DeepSpeed's engine: forward, backward (÷ accumulation steps
    unless told not to), step (nothing to do here), an optimizer (none here)."""

    def __init__(self, model):
        self.module = model
        self.optimizer = None

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def gradient_accumulation_steps(self) -> int:
        return GAS

    def backward(self, loss, scale_wrt_gas: bool = True):
        (loss / GAS if scale_wrt_gas else loss).backward()

    def step(self):
        pass


def lm_loss(logits, labels):
    return cross_entropy(logits, labels) / (labels != -100).sum()


def config():
    cfg = tiny()
    cfg.train.micro_batch_size = BATCH  # the activations' shape between stages
    return cfg


def model_for(cfg, state: ParallelState) -> OLMoE:
    model = cfg.model.build(cfg.moe)
    if state.pp > 1:
        model = apply_pipeline(model, state, None)
    init_weights(model, std=0.2, seed=0)
    return model


def run_pipeline_step(rank: int, world_size: int, cfg, data) -> tuple:
    state = ParallelState(world_size, rank, pp=world_size).build_groups()
    model = model_for(cfg, state)
    stats = StepStats(cfg, model, torch.device("cpu"))
    with host_reads() as in_step:
        pipeline_schedule.train_step(Engine(model), state, cfg, lambda m: ({"tokens": data[m][0]}, data[m][1]),
                                     lm_loss, stats)  # the model's inputs, the labels
    with host_reads() as in_read:
        logged, load, _ = stats.read(state, GAS, sequence_parallel=False)
    return dict(in_step), dict(in_read), logged, load


def plain_step(cfg, data) -> tuple:
    """The trainer's path without a pipeline: forward, add, backward per micro-batch."""
    model = model_for(cfg, ParallelState(1, 0))
    stats = StepStats(cfg, model, torch.device("cpu"))
    with host_reads() as in_step:
        for tokens, labels in data:
            out = model(tokens)
            lm = lm_loss(out.logits, labels)
            stats.add(out.aux_loss, lm)
            ((lm + out.aux_loss) / GAS).backward()
    with host_reads() as in_read:
        logged, load, _ = stats.read(ParallelState(1, 0), GAS, sequence_parallel=False)
    return dict(in_step), dict(in_read), logged, load


def test_step_statistics_are_read_once_per_step_and_pp2_logs_the_one_rank_values():
    cfg = config()
    data = micro_batches(cfg, GAS)
    in_step, in_read, want, want_load = plain_step(cfg, data)
    assert in_step == {} and in_read == {"tolist": 1}
    assert set(want) == {"loss", "lm_loss", "lb_loss", "z_loss"} and want_load.shape == (2, 8)
    assert want["loss"] > want["lm_loss"] > 0 and want_load.sum() == GAS * BATCH * SEQ * 2 * 2  # top-2, 2 layers
    for rank, (in_step, in_read, logged, load) in enumerate(run_ranks(run_pipeline_step, 2, cfg, data)):
        assert in_step == {}, f"rank {rank} read to the host during the step: {in_step}"
        assert in_read == {"tolist": 1}, rank
        for key, value in want.items():
            assert abs(logged[key] - value) <= 1e-6 * abs(value), (rank, key, logged[key], value)
        assert torch.equal(load, want_load), rank


def test_a_host_copy_holds_the_values_it_was_given():
    """On the CPU the values are taken at once: a later change of the tensor does not reach them."""
    t = torch.tensor([1.0, 2.5])
    copy = HostCopy(t)
    t.add_(1)
    assert copy.values() == [1.0, 2.5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy behind queued work is CUDA's")
def test_a_host_copy_waits_for_its_values_not_for_the_work_queued_after_it():
    """What lets the trainer queue the next step before reading this one: values() returns while
    work queued after the copy still runs."""
    x = torch.arange(4.0, device="cuda") * 2
    copy = HostCopy(x)
    a = torch.randn(8192, 8192, device="cuda")
    for _ in range(30):  # ~30 ms of matmuls queued behind the copy
        a = torch.tanh(a @ a)
    later = torch.cuda.Event()
    later.record()
    assert copy.values() == [0.0, 2.0, 4.0, 6.0]
    assert not later.query()  # still running
    torch.cuda.synchronize()
