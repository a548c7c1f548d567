"""configs/ablations/ and megamoe-ablations: valid one-respect changes of a base, tabulated."""

import json
import subprocess
import sys

import pytest
import yaml

from megamoe.config import load_config
from runs import REPO, TINY

ABLATIONS = REPO / "configs" / "ablations"
NAMES = sorted(p.stem for p in ABLATIONS.glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("name", NAMES)
def test_each_ablation_is_a_valid_change_of_the_base(name):
    spec = yaml.safe_load((ABLATIONS / f"{name}.yaml").read_text())
    assert set(spec) <= {"overrides", "upcycle_at"}
    pairs = [f"{k}={v}" for k, v in (spec.get("overrides") or {}).items()]
    base = load_config(ABLATIONS / "base.yaml").validate(1)
    changed = load_config(ABLATIONS / "base.yaml", pairs).validate(1)
    assert changed != base or spec.get("upcycle_at"), name


def test_tool_trains_the_chosen_ablations_and_tabulates_them(tmp_path):
    tiny = [*TINY, "train.eval_batches=1"]
    proc = subprocess.run([sys.executable, "-m", "megamoe.cli.ablations", "--budget-tokens", "256", "--out",
                           str(tmp_path), "--set", *tiny, "--", "no-lb-loss", "upcycled"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "ablations.json").read_text())
    assert list(rows) == ["no-lb-loss", "upcycled"]
    for row in rows.values():
        assert row["eval_loss"] > 0 and row["tokens_per_sec"] > 0 and row["load_max_over_mean"] >= 1
    assert "| upcycled |" in proc.stdout and (tmp_path / "ablations.md").is_file()
    dense = [json.loads(line) for line in (tmp_path / "upcycled-dense" / "metrics.jsonl").read_text().splitlines()]
    moe = [json.loads(line) for line in (tmp_path / "upcycled" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in dense] == [1] and [r["step"] for r in moe] == [1]  # half the 2 steps each
    assert dense[0]["expert_load"] == [] and len(moe[0]["expert_load"]) == 2


def test_without_names_every_ablation_runs_and_names_may_follow_set(tmp_path, monkeypatch, capsys):
    from megamoe.cli import ablations
    ran = []
    monkeypatch.setattr(ablations, "run_ablation", lambda name, out, budget, sets, nproc: ran.append((name, sets)))
    monkeypatch.setattr(ablations, "summarise",
                        lambda run: {"eval_loss": 1.0, "tokens_per_sec": 1.0, "load_max_over_mean": 1.0})
    assert ablations.main(["--budget-tokens", "256", "--out", str(tmp_path)]) == 0
    assert ran == [(name, []) for name in ["base", *NAMES]]
    ran.clear()  # argparse hands the names after --set to it: they are still names
    assert ablations.main(["--budget-tokens", "256", "--out", str(tmp_path), "--set", "train.steps=2", "top-2",
                           "dense"]) == 0
    assert ran == [("top-2", ["train.steps=2"]), ("dense", ["train.steps=2"])]
    with pytest.raises(SystemExit) as e:
        ablations.main(["--budget-tokens", "256", "--out", str(tmp_path), "--set", "train.steps=2", "top-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("megamoe-ablations: error: no ablation named top-3: choose from base, ")
