"""Routing analysis: the statistics are the counts' arithmetic, and the tool runs on a run."""

import json
import subprocess
import sys

import pytest
import torch

from megamoe.analysis.paper import coactivation, router_saturation, vocab_specialisation
from megamoe.analysis.routing import report
from runs import launch


def test_report_arithmetic():
    # 1 layer, 2 experts: code tokens all to expert 0, docs split evenly.
    counts = {"code": torch.tensor([[6.0, 0.0]]), "docs": torch.tensor([[3.0, 3.0]])}
    rep = report(counts)
    assert rep["domain_share"] == {"code": 0.5, "docs": 0.5}
    layer = rep["layers"][0]
    assert layer["share"] == [0.75, 0.25] and layer["imbalance"] == pytest.approx(1.5)
    # expert 0: 6 of its 9 tokens are code (2/3) over a base rate of 1/2 -> 4/3
    assert layer["specialisation"]["code"] == pytest.approx([4 / 3, 0.0])
    assert layer["specialisation"]["docs"] == pytest.approx([2 / 3, 2.0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """2 steps with a checkpoint after each, the first MoE layer dense (layer 0)."""
    run = tmp_path_factory.mktemp("run") / "run"
    launch(run, 1, ["train.steps=2", "train.save_interval=1", "model.n_layers=3", "moe.dense_layers=[0]"])
    return run


def test_tool_reports_every_layer_of_a_trained_run(trained, tmp_path):
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli.routing", str(trained), "--tokens", "256",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    rep = json.loads(out.read_text())
    assert [layer["layer"] for layer in rep["layers"]] == [1, 2] and set(rep["domain_share"]) == {"code", "docs"}
    for layer in rep["layers"]:
        assert sum(layer["share"]) == pytest.approx(1.0) and layer["imbalance"] >= 1.0
    assert "imbalance" in proc.stdout


def test_tool_plots_the_papers_analyses_on_jsonl_domains(trained, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"source": s, "text": t}) for s, t in [
        ("code", "def add(a, b):\n    return a + b\n" * 8), ("prose", "The cat sat on the mat. " * 12)]))
    plots = tmp_path / "plots"
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli.routing", str(trained), "--jsonl", str(data),
                           "--domain-field", "source", "--tokens", "64", "--checkpoints", "all",
                           "--plots", str(plots), "--no-progress"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("domain_specialisation", "coactivation", "vocabulary_specialisation", "router_saturation"):
        assert (plots / f"{name}.png").read_bytes()[:4] == b"\x89PNG", name
    saturation = json.loads((plots / "router_saturation.json").read_text())
    assert saturation["steps"] == [1, 2] and saturation["layers"] == [1, 2]
    assert saturation["saturation"][-1] == [1.0, 1.0]  # the final checkpoint against itself
    assert all(0 <= s <= 1 for s in saturation["saturation"][0])
    co = json.loads((plots / "coactivation.json").read_text())["matrix"]
    assert len(co) == 2 and all(row[i] == 0 for m in co for i, row in enumerate(m))
    vocab = json.loads((plots / "vocabulary_specialisation.json").read_text())["experts"]
    assert len(vocab) == 2 and len(vocab[0]) == 8
    assert set(json.loads((plots / "domain_specialisation.json").read_text())["domain_share"]) == {"code", "prose"}
    bad = subprocess.run([sys.executable, "-m", "megamoe.cli.routing", str(trained), "--jsonl", str(data),
                          "--domain-field", "nope"], capture_output=True, text=True)
    assert bad.returncode == 2 and "megamoe-routing: error:" in bad.stderr and "'nope'" in bad.stderr


# The paper's §5 analyses on hand-sized choices: 3 experts, top-2, 4 tokens.
CHOICES = torch.tensor([[0, 1], [0, 2], [1, 0], [2, 1]])  # [N, k]
TOKENS = torch.tensor([7, 7, 5, 9])


def test_router_saturation_is_the_shared_share_of_top_k():
    final = [torch.tensor([[1, 0], [2, 1], [1, 2], [2, 1]])]
    # token 0: {0,1} vs {1,0}: 2/2; token 1: {0,2} vs {2,1}: 1/2; token 2: {1,0} vs {1,2}: 1/2; token 3: 2/2
    assert router_saturation([CHOICES], final) == pytest.approx([(1 + 0.5 + 0.5 + 1) / 4])
    assert router_saturation(final, final) == [1.0]


def test_coactivation_is_the_conditional_share():
    c = coactivation(CHOICES, 3)
    # expert 0 chosen by tokens 0, 1, 2: with 1 in 2 of them, with 2 in 1
    assert c[0].tolist() == pytest.approx([0.0, 2 / 3, 1 / 3])
    # expert 2 chosen by tokens 1, 3: with 0 once, with 1 once
    assert c[2].tolist() == pytest.approx([0.5, 0.5, 0.0])


def test_vocabulary_specialisation_ranks_each_experts_tokens():
    spec = vocab_specialisation(TOKENS, CHOICES, 3, top=2)
    # expert 0: token 7 twice of 2 (1.0), token 5 once of 1 (1.0): tie, lower id first
    assert spec[0] == [(5, 1.0), (7, 1.0)]
    # expert 2: token 9 (1 of 1), token 7 (1 of 2)
    assert spec[2] == [(9, 1.0), (7, 0.5)]
    assert vocab_specialisation(TOKENS, CHOICES, 3, min_count=2)[1] == [(7, 0.5)]
