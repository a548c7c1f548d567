"""The equivalence matrix (issue 3): every layout of the real trainer is the 1-rank run.

Each case runs `python -m megamoe.train` on N gloo ranks and compares it with the 1-rank run of
the same model (gradient accumulation, same global batch): step-1 loss, loss curve, final
weights (`assert_same_run`), the end-of-run eval loss, and the logged auxiliary losses and
expert loads, which under pipeline parallelism are gathered from every stage.
"""

import numpy as np
import pytest

from runs import assert_same_run, launch, metrics

# TINY runs 4 steps: one eval at the end, through the pipeline, with a downstream task
EVAL = ["train.eval_interval=4", "train.eval_tasks=[next_line]", "train.eval_limit=16"]
DEEP = ("model.n_layers=4",)
CAPACITY = ("moe.capacity_factor=1.0",)
EXPERT_CHOICE = ("moe.routing=expert_choice",)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """1-rank runs by model variant, made on first use and shared by the module."""
    runs = {}

    def get(variant: tuple[str, ...]):
        if variant not in runs:
            runs[variant] = tmp_path_factory.mktemp("ref") / "run"
            launch(runs[variant], 1, [*variant, *EVAL])
        return runs[variant]

    return get


def assert_same_logs(run, ref) -> None:
    for a, b in zip(metrics(run), metrics(ref)):
        for key in ("lm_loss", "lb_loss", "z_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a["step"], key)
    first, ref_first = metrics(run)[0], metrics(ref)[0]
    # per-layer expert shares: every stage's layers (and every SP chunk), in the 1-rank order
    np.testing.assert_allclose(first["expert_load"], ref_first["expert_load"], atol=1e-6)
    assert metrics(run)[-1]["eval_loss"] == pytest.approx(metrics(ref)[-1]["eval_loss"], rel=1e-5)
    for key in ("task/next_line/acc", "task/next_line/acc_norm"):  # scored in shares, summed
        assert metrics(run)[-1][key] == metrics(ref)[-1][key], key


def layout(name: str, nproc: int, overrides: list[str], variant: tuple[str, ...] = ()):
    return pytest.param(nproc, overrides, variant, id=name)


@pytest.mark.parametrize("nproc,overrides,variant", [
    layout("tp2", 2, ["parallel.tensor=2"]),
    layout("tp2-sp", 2, ["parallel.tensor=2", "parallel.sequence_parallel=true"]),
    layout("pp2", 2, ["parallel.pipeline=2"]),
    layout("pp4", 4, ["parallel.pipeline=4"], DEEP),
    layout("pp2-uneven-1-3", 2, ["parallel.pipeline=2", "parallel.pipeline_layers=[1,3]"], DEEP),
    layout("ep2", 2, ["parallel.expert=2"]),
    layout("ep4", 4, ["parallel.expert=4"]),
    layout("tp2xep2", 4, ["parallel.tensor=2", "parallel.expert=2"]),
    layout("pp2xep2", 4, ["parallel.pipeline=2", "parallel.expert=2"]),
    layout("tp2xpp2", 4, ["parallel.tensor=2", "parallel.pipeline=2"]),
    layout("tp2xpp2xep2-dp2-zero1", 8, ["parallel.tensor=2", "parallel.pipeline=2", "parallel.expert=2",
                                        "parallel.zero_stage=1"]),
    layout("ep2-capacity", 2, ["parallel.expert=2"], CAPACITY),
    layout("ep2-expert-choice", 2, ["parallel.expert=2"], EXPERT_CHOICE),
    layout("ckpt-full-pp2", 2, ["parallel.pipeline=2", "parallel.activation_checkpointing=full"]),
    layout("ckpt-full-tp2xep2-sp", 4, ["parallel.tensor=2", "parallel.expert=2", "parallel.sequence_parallel=true",
                                       "parallel.activation_checkpointing=full"]),
    layout("ckpt-selective-ep2", 2, ["parallel.expert=2", "parallel.activation_checkpointing=selective"]),
    layout("ckpt-selective-tp2xpp2-sp", 4, ["parallel.tensor=2", "parallel.pipeline=2",
                                            "parallel.sequence_parallel=true",
                                            "parallel.activation_checkpointing=selective"]),
])
def test_layout_gives_the_one_rank_run(tmp_path, references, nproc, overrides, variant):
    ref = references(variant)
    run = tmp_path / "run"
    launch(run, nproc, [*variant, *overrides, *EVAL])
    assert_same_run(run, ref)
    assert_same_logs(run, ref)


@pytest.mark.parametrize("overrides,key", [
    (["parallel.pipeline=4"], "parallel.pipeline"),  # deeper than the 2 layers
    (["model.n_layers=3", "parallel.pipeline=2"], "parallel.pipeline"),  # uneven, no split given
    (["model.n_layers=3", "parallel.pipeline=2", "parallel.pipeline_layers=[1,1]"], "parallel.pipeline_layers"),
])
def test_bad_pipeline_is_refused_before_any_process_group(tmp_path, overrides, key):
    run = tmp_path / "run"
    proc = launch(run, 2, overrides, check=False)
    assert proc.returncode != 0 and f"error: {key}:" in proc.stderr, proc.stderr[-2000:]
    assert not run.exists()  # rank 0 creates the run dir only after the process groups
