"""Routing analysis of a checkpoint on the embedded corpus's two domains (code, docs).

    megamoe-routing runs/tiny-cpu --tokens 16384 --json routing.json
"""

import argparse
import json
import sys
from pathlib import Path

from ..analysis.routing import domain_batches, expert_counts, format_report, report
from ..checkpoint.io import CheckpointError
from ..train.sample import load_model, tokenizer_for


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megamoe-routing", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="run directory (latest checkpoint) or step_* directory")
    p.add_argument("--tokens", type=int, default=16384, help="tokens per domain")
    p.add_argument("--json", type=Path, help="also write the full statistics here")
    args = p.parse_args(argv)
    try:
        model, _ = load_model(args.checkpoint)
    except CheckpointError as e:
        print(f"megamoe-routing: error: {e}", file=sys.stderr)
        return 2
    if not model.cfg.moe.num_experts:
        print("megamoe-routing: error: this checkpoint is a dense model (moe.num_experts=0)", file=sys.stderr)
        return 2
    tok = tokenizer_for(model.cfg)
    seq = model.cfg.data.seq_length
    counts = {d: expert_counts(model, domain_batches(tok, d, args.tokens, seq)) for d in ("code", "docs")}
    rep = report(counts)
    print(format_report(rep))
    if args.json:
        args.json.write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
