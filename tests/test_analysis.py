"""Routing analysis: the statistics are the counts' arithmetic, and the tool runs on a run."""

import json
import subprocess
import sys

import pytest
import torch

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


def test_tool_reports_every_layer_of_a_trained_run(tmp_path):
    run = tmp_path / "run"
    launch(run, 1, ["train.steps=2"])
    out = tmp_path / "routing.json"
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli.routing", str(run), "--tokens", "256",
                           "--json", str(out)], capture_output=True, text=True, check=True)
    rep = json.loads(out.read_text())
    assert len(rep["layers"]) == 2 and set(rep["domain_share"]) == {"code", "docs"}
    for layer in rep["layers"]:
        assert sum(layer["share"]) == pytest.approx(1.0) and layer["imbalance"] >= 1.0
    assert "imbalance" in proc.stdout
