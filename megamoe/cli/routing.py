"""Routing analysis of a run (the OLMoE paper's §5) on the embedded corpus or your own data.

    megamoe-routing runs/tiny-cpu --tokens 16384 --json routing.json
    megamoe-routing RUN --data data/web data/code --checkpoints all --plots figs/
    megamoe-routing RUN --jsonl eval.jsonl --domain-field source --plots figs/

Domains: the embedded corpus's two (code, docs) by default; or one per `--data` prefix (datasets
tokenized with the run's tokenizer, named by their file name); or the values of a JSONL field.
Prints load imbalance and domain specialisation per layer. `--plots DIR` also writes, each as
PNG + JSON: domain specialisation, expert co-activation, vocabulary specialisation (the tokens
most routed to each expert) and, with `--checkpoints all`, router saturation (the top-k of
every kept checkpoint shared with the final one).
"""

import argparse
import json
import sys
from pathlib import Path

from ..analysis import paper
from ..analysis.routing import domain_batches, format_report, indexed_batches, jsonl_domain_batches, report
from ..checkpoint.canonical import resolve
from ..checkpoint.io import CheckpointError
from ..inference.load import load_model, tokenizer_for


def fail(message: str) -> int:
    print(f"megamoe-routing: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megamoe-routing", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="run directory (latest checkpoint) or step_* directory")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per domain")
    p.add_argument("--data", nargs="+", metavar="PREFIX", help="tokenized datasets, one domain each")
    p.add_argument("--jsonl", type=Path, help="a JSONL file whose records name their domain")
    p.add_argument("--domain-field", default="domain", help="--jsonl: the field holding the domain")
    p.add_argument("--text-field", default="text", help="--jsonl: the field holding the text")
    p.add_argument("--checkpoints", choices=["latest", "all"], default="latest",
                   help="all: also router saturation over the run's kept checkpoints")
    p.add_argument("--plots", type=Path, metavar="DIR", help="write each analysis as PNG + JSON here")
    p.add_argument("--top-tokens", type=int, default=8, help="vocabulary specialisation: tokens per expert")
    p.add_argument("--json", type=Path, help="also write the printed statistics here")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --json file and the files of a non-empty --plots directory")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    args.no_progress = args.no_progress or not sys.stderr.isatty()  # no \r lines in logs
    if args.data and args.jsonl:
        return fail("give --data or --jsonl, not both")
    if args.tokens <= 0:
        return fail(f"--tokens {args.tokens}: give the number of tokens per domain (e.g. 16384; at least one "
                    "sequence of the run's data.seq_length)")
    if args.json and not args.json.parent.is_dir():
        return fail(f"--json {args.json}: its folder {args.json.parent} does not exist; create it or give another path")
    if args.plots and args.plots.exists() and not args.plots.is_dir():
        return fail(f"--plots {args.plots} is a file; give a directory for the plots")
    if args.json and args.json.exists() and not args.overwrite:
        return fail(f"--json {args.json} exists; give a new path or pass --overwrite to replace it")
    if args.plots and args.plots.is_dir() and any(args.plots.iterdir()) and not args.overwrite:
        return fail(f"--plots {args.plots} is not empty; give a new directory or pass --overwrite "
                    "to replace its plots")
    if args.checkpoints == "all" and not (args.checkpoint / "checkpoints").is_dir():
        return fail(f"--checkpoints all needs a run directory; {args.checkpoint} has no checkpoints/")
    try:
        model, cfg = load_model(args.checkpoint)
        tok = tokenizer_for(cfg)
    except CheckpointError as e:
        return fail(str(e))
    if not cfg.moe.num_experts:
        return fail("this checkpoint is a dense model (moe.num_experts=0)")
    if cfg.moe.routing != "token_choice":
        return fail("the analyses need token-choice routing; this run uses moe.routing=expert_choice")
    if cfg.moe.backend != "megamoe":
        return fail("the analyses read megamoe's router; this run uses moe.backend=deepspeed")
    seq = cfg.data.seq_length
    try:
        if args.data:
            domains = {Path(prefix).name: indexed_batches(prefix, args.tokens, seq) for prefix in args.data}
        elif args.jsonl:
            domains = jsonl_domain_batches(args.jsonl, args.domain_field, args.text_field, tok, args.tokens, seq)
        else:
            domains = {d: domain_batches(tok, d, args.tokens, seq) for d in ("code", "docs")}
    except (OSError, ValueError) as e:
        return fail(str(e))
    progress, E, layers = not args.no_progress, cfg.moe.num_experts, cfg.moe_layer_ids()
    choices = {d: paper.record_choices(model, b, progress, desc=d) for d, b in domains.items()}
    rep = report({d: paper.expert_counts(c, E) for d, (_, c) in choices.items()}, layers)
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    if args.plots:
        write_plots(args, model, domains, choices, rep, tok, layers)
    return 0


def write_plots(args, model, domains, choices, rep, tok, layers) -> None:
    import numpy as np
    import torch

    from ..analysis import plots
    out, E = args.plots, model.moe_cfg.num_experts
    out.mkdir(parents=True, exist_ok=True)

    def save(name: str, data) -> None:
        (out / f"{name}.json").write_text(json.dumps(data, indent=1))

    spec = {d: [layer["specialisation"][d] for layer in rep["layers"]] for d in domains}
    save("domain_specialisation", {"layers": layers, "domain_share": rep["domain_share"], "specialisation": spec})
    plots.domain_plot({d: np.asarray(s) for d, s in spec.items()}, layers, out / "domain_specialisation.png")

    tokens = torch.cat([t for t, _ in choices.values()])
    all_choices = [torch.cat(per_layer) for per_layer in zip(*(c for _, c in choices.values()))]
    co = [paper.coactivation(c, E) for c in all_choices]
    save("coactivation", {"layers": layers, "matrix": [m.tolist() for m in co]})
    plots.layer_heatmaps([m.numpy() for m in co], layers, "Expert co-activation: P(column chosen | row chosen)",
                         "expert", "expert", out / "coactivation.png", vmax=1)

    vocab = [paper.vocab_specialisation(tokens, c, E, args.top_tokens, min_count=2) for c in all_choices]
    save("vocabulary_specialisation", {"layers": layers, "experts": [
        [[{"token": v, "text": tok.decode([v]), "share": s} for v, s in expert] for expert in layer]
        for layer in vocab]})
    top_share = [[expert[0][1] if expert else 0.0 for expert in layer] for layer in vocab]
    plots.layer_heatmaps([np.asarray([row]) for row in top_share], layers,
                         "Vocabulary specialisation: share of its top token routed to each expert",
                         "expert", "", out / "vocabulary_specialisation.png", vmax=1)

    if args.checkpoints == "all":
        final = resolve(args.checkpoint)
        steps = sorted(d for d in final.parent.glob("step_*") if d.is_dir())
        batches = [b for bs in domains.values() for b in bs]
        final_choices = paper.record_choices(model, batches, not args.no_progress, desc=final.name)[1]
        curve = []
        for step_dir in steps:
            m = model if step_dir.name == final.name else load_model(step_dir)[0]
            curve.append(paper.router_saturation(
                paper.record_choices(m, batches, not args.no_progress, desc=step_dir.name)[1], final_choices))
        numbers = [int(d.name.removeprefix("step_")) for d in steps]
        save("router_saturation", {"layers": layers, "steps": numbers, "saturation": curve})
        plots.saturation_plot(numbers, curve, layers, out / "router_saturation.png")


if __name__ == "__main__":
    sys.exit(main())
