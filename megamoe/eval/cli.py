"""Score a checkpoint on downstream tasks, offline, on one device: a JSON result.

    megamoe-eval runs/tiny-cpu --tasks next_line next_line:mc data/arc_easy.jsonl
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ..checkpoint.canonical import resolve
from ..checkpoint.files import read_meta
from ..checkpoint.io import CheckpointError
from ..train.loss import cross_entropy
from .evaluator import Evaluator
from .score import model_forward
from .tasks import TaskError, load_task


def parse_args(argv):
    p = argparse.ArgumentParser(prog="megamoe-eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run directory (its latest checkpoint) or step_* directory")
    p.add_argument("--tasks", nargs="+", required=True, metavar="SPEC",
                   help="built-in task (next_line) or FILE.jsonl, each optionally :mc for the letter format")
    p.add_argument("--limit", type=int, help="score only the first N items of each task")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: a GPU when there is one")
    p.add_argument("--samples", action="store_true",
                   help="add every item's log-likelihoods, gold and predicted choice to the result")
    p.add_argument("--output", type=Path, help="also write the result to this file (never replaced)")
    args = p.parse_args(argv)
    for name in ("limit", "batch_size"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no GPU is visible (torch.cuda.is_available() is False); use --device cpu")
    if args.output is not None and args.output.exists():
        p.error(f"--output {args.output} exists; give a new path or remove it first")
    if args.output is not None and not args.output.parent.is_dir():
        p.error(f"--output {args.output}: its folder {args.output.parent} does not exist; create it or give "
                "another path")
    return args


def evaluate(checkpoint: Path, specs: list[str], limit: int | None = None, batch_size: int = 16,
             device: str = "auto", samples: bool = False, progress: bool = False) -> dict:
    """{"checkpoint", "step", "tasks": {name: {metrics, "items"[, "samples"]}}} (Evaluator.results).
    Tasks are read first, so a bad task file fails before the model loads."""
    from ..inference.load import load_model, tokenizer_for

    tasks = [load_task(spec, limit) for spec in specs]
    step_dir = resolve(checkpoint)
    device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                          "cpu" if device == "auto" else device)
    model, cfg = load_model(step_dir, device)
    evaluator = Evaluator(tasks, tokenizer_for(cfg), cfg.model.max_seq_len)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(evaluator.windows), unit="seq", desc="megamoe-eval", file=sys.stderr)
    with torch.no_grad():
        scores = evaluator.scores(model_forward(model, cross_entropy, device), batch_size, None, progress=bar)
    if bar is not None:
        bar.close()
    results = evaluator.results(scores)
    if not samples:
        for result in results.values():
            del result["samples"]
    return {"checkpoint": str(step_dir), "step": read_meta(step_dir)["step"], "tasks": results}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = evaluate(args.checkpoint, args.tasks, args.limit, args.batch_size, args.device,
                          args.samples, progress=sys.stderr.isatty())
    except (TaskError, CheckpointError) as e:
        print(f"megamoe: error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.output is not None:
        args.output.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
