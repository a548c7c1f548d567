"""Sample text from a megamoe checkpoint (a run directory or one step_* directory).

    megamoe-generate runs/tiny-cpu --prompt "def " --max-new-tokens 64
"""

import argparse
import sys
from pathlib import Path

from ..checkpoint.io import CheckpointError
from ..inference.generate import sample_from_checkpoint


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megamoe-generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, help="run directory (uses its latest checkpoint) or step_* directory")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for bad, problem in [(not args.prompt, "--prompt is empty; give the text to continue"),
                         (args.max_new_tokens < 1, f"--max-new-tokens {args.max_new_tokens}: give 1 or more"),
                         (not args.temperature >= 0, f"--temperature {args.temperature}: give 0 (greedy) or more"),
                         (args.top_k < 1, f"--top-k {args.top_k}: sample from 1 or more of the likeliest "
                                          "tokens (--temperature 0 is greedy)")]:
        if bad:
            print(f"megamoe-generate: error: {problem}", file=sys.stderr)
            return 2
    try:
        text = sample_from_checkpoint(args.checkpoint, args.prompt, args.max_new_tokens,
                                      temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    except CheckpointError as e:
        print(f"megamoe-generate: error: {e}", file=sys.stderr)
        return 2
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
