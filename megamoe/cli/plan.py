"""Valid parallel layouts for a config and world size, with what one rank holds.

    megamoe-plan --config olmoe-1b-7b --world-size 8 --gpu-gib 80
"""

import argparse
import sys

from ..config import ConfigError, load_config
from ..parallel.plan import plan_layouts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megamoe-plan", description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--fp32", action="store_true", help="fp32 training (CPU) instead of bf16")
    p.add_argument("--gpu-gib", type=float, help="GPU memory: marks layouts whose model state does "
                   "not fit it, or leaves less than a quarter of it for activations")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = p.parse_args(argv)
    if args.gpu_gib is not None and not (args.gpu_gib > 0 and args.gpu_gib != float("inf")):
        print(f"megamoe-plan: error: --gpu-gib {args.gpu_gib}: give one GPU's memory in GiB (e.g. 80)", file=sys.stderr)
        return 2
    if args.world_size < 1:
        print(f"megamoe-plan: error: --world-size {args.world_size}: give the number of ranks, "
              "1 or more", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        plans = plan_layouts(cfg, args.world_size, bf16=not args.fp32)
    except ConfigError as e:
        print(f"megamoe-plan: error: {e}", file=sys.stderr)
        return 2
    cache = "; FP8 weight cache included" if cfg.fp8_keys() and cfg.train.fp8_weight_cache else ""
    print(f"{'tensor':>6} {'pipeline':>8} {'expert':>6} {'data':>5} {'params/rank':>12} "
          f"{'state GiB/rank':>14}  (ZeRO {cfg.parallel.zero_stage}{cache}; activations not included)")
    for pl in plans:
        print(f"{pl.tp:>6} {pl.pp:>8} {pl.ep:>6} {pl.dp:>5} {pl.params_per_rank / 1e9:>11.3f}B "
              f"{pl.state_gib:>14.1f}" + _fit(pl.state_gib, args.gpu_gib))
    return 0


def _fit(state_gib: float, gpu_gib: float | None) -> str:
    if gpu_gib is None or state_gib <= 0.75 * gpu_gib:
        return ""
    return "  (does not fit)" if state_gib > gpu_gib else "  (tight: activations get < 1/4)"


if __name__ == "__main__":
    sys.exit(main())
