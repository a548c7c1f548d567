"""Train the OLMoE paper's §4 ablations (configs/ablations/) for a token budget; tabulate them.

    megamoe-ablations --budget-tokens 50_000_000 --out runs/ablations dense top-2 aux-free
    megamoe-ablations --budget-tokens 20000 --out /tmp/abl --set train.device=cpu ... base

Without a NAME every ablation runs; `--set`'s words without a `=` are names. Each ablation is
`configs/ablations/base.yaml` plus its file's `overrides` (`base` is the base
itself); `train.steps` = budget / (global batch × sequence length). `upcycled` trains the dense
model (num_experts 0) for `upcycle_at` of the budget, upcycles it and trains the MoE for the rest.
Each run goes to OUT/NAME (an existing run there is continued, not overwritten); the table of
final eval loss, mean tokens/s and load imbalance (max/mean expert load, averaged over MoE
layers, at the last step) goes to stdout and OUT/ablations.md + .json.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

from ..config import PRESETS

ABLATIONS = PRESETS / "ablations"


def overrides_of(name: str) -> tuple[list[str], float | None]:
    """(section.key=value overrides, upcycle fraction or None) of one ablation."""
    if name == "base":
        return [], None
    spec = yaml.safe_load((ABLATIONS / f"{name}.yaml").read_text())
    pairs = [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) or v is None else v}"
             for k, v in (spec.get("overrides") or {}).items()]
    return pairs, spec.get("upcycle_at")


def train(run_dir: Path, overrides: list[str], nproc: int) -> None:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "megamoe.train", "--config", str(ABLATIONS / "base.yaml"),
           *overrides, f"run.dir={run_dir}"]
    subprocess.run(cmd, check=True)


def run_ablation(name: str, out: Path, budget: int, extra: list[str], nproc: int) -> Path:
    from ..config import load_config
    pairs, upcycle_at = overrides_of(name)
    cfg = load_config(ABLATIONS / "base.yaml", [*pairs, *extra])
    steps = max(1, budget // (cfg.train.global_batch_size * cfg.data.seq_length))
    run = out / name
    if upcycle_at is None:
        train(run, [*pairs, *extra, f"train.steps={steps}"], nproc)
        return run
    from ..checkpoint.upcycle import upcycle
    dense_steps = max(1, int(steps * upcycle_at))
    dense = out / f"{name}-dense"
    train(dense, [*pairs, *extra, "moe.num_experts=0", f"train.steps={dense_steps}"], nproc)
    if not run.exists():
        upcycle(dense, run, cfg.moe.num_experts, cfg.moe.top_k, progress=False)
    train(run, [*pairs, *extra, f"train.steps={max(1, steps - dense_steps)}"], nproc)
    return run


def summarise(run: Path) -> dict:
    """Final eval loss, mean tokens/s (first logged step left out: compilation), final imbalance."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_sec"] for r in records[1:]] or [records[0]["tokens_per_sec"]]
    imbalance = records[-1].get("load_max_over_mean") or []
    return {"eval_loss": next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None),
            "tokens_per_sec": sum(speeds) / len(speeds),
            "load_max_over_mean": sum(imbalance) / len(imbalance) if imbalance else None}


def table(rows: dict[str, dict]) -> str:
    def fmt(v, spec):
        return "-" if v is None else format(v, spec)
    lines = ["| ablation | final eval loss | tokens/s | load max/mean |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {fmt(r['eval_loss'], '.4f')} | {fmt(r['tokens_per_sec'], ',.0f')} | "
              f"{fmt(r['load_max_over_mean'], '.2f')} |" for n, r in rows.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    names = ["base"] + sorted(p.stem for p in ABLATIONS.glob("*.yaml") if p.stem != "base")
    p = argparse.ArgumentParser(prog="megamoe-ablations", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # no `choices=`: argparse checks an empty NAME list against them too and refuses it
    p.add_argument("ablations", nargs="*", metavar="NAME", help=f"default: all of {names}")
    p.add_argument("--budget-tokens", type=int, required=True, help="training tokens per ablation")
    p.add_argument("--out", type=Path, required=True, help="one run directory per ablation goes here")
    p.add_argument("--set", nargs="*", default=[], metavar="section.key=value",
                   help="applied to every run (a word without = among them is a NAME)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per run (torchrun)")
    args = p.parse_args(argv)
    # argparse gives --set every word up to the next flag: the names after it are its words without a "="
    args.ablations += [v for v in args.set if "=" not in v]
    args.set = [v for v in args.set if "=" in v]
    unknown = [n for n in args.ablations if n not in names]
    if unknown:
        p.error(f"no ablation named {', '.join(unknown)}: choose from {', '.join(names)}")
    rows = {}
    for name in args.ablations or names:
        try:
            rows[name] = summarise(run_ablation(name, args.out, args.budget_tokens, args.set, args.nproc))
        except subprocess.CalledProcessError as e:
            print(f"megamoe-ablations: error: {name} failed ({e.returncode}); see its output above", file=sys.stderr)
            rows[name] = {"eval_loss": None, "tokens_per_sec": None, "load_max_over_mean": None}
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ablations.md").write_text(text + "\n")
    (args.out / "ablations.json").write_text(json.dumps(rows, indent=1))
    return 1 if any(r["eval_loss"] is None for r in rows.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
