"""Valid parallel layouts for a config and world size, with what one rank holds.

    python tools/plan_layout.py --config configs/olmoe-1b-7b.yaml --world-size 8 --gpu-gib 80
"""

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megamoe.config import ConfigError, load_config  # noqa: E402
from megamoe.parallel.plan import plan_layouts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--fp32", action="store_true", help="fp32 training (CPU) instead of bf16")
    p.add_argument("--gpu-gib", type=float, help="mark layouts whose model state leaves less than "
                   "a quarter of this for activations")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        plans = plan_layouts(cfg, args.world_size, bf16=not args.fp32)
    except ConfigError as e:
        print(f"plan_layout: error: {e}", file=sys.stderr)
        return 2
    if not plans:
        print(f"plan_layout: no layout of {args.world_size} ranks is valid for this config "
              "(see `python -m megamoe.train` errors for why)", file=sys.stderr)
        return 2
    print(f"{'tensor':>6} {'pipeline':>8} {'expert':>6} {'data':>5} {'params/rank':>12} "
          f"{'state GiB/rank':>14}  (ZeRO {cfg.parallel.zero_stage}; activations not included)")
    for pl in plans:
        tight = args.gpu_gib is not None and pl.state_gib > 0.75 * args.gpu_gib
        print(f"{pl.tp:>6} {pl.pp:>8} {pl.ep:>6} {pl.dp:>5} {pl.params_per_rank / 1e9:>11.3f}B "
              f"{pl.state_gib:>14.1f}" + ("  (tight)" if tight else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
