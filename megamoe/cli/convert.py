"""Convert, reshard, upcycle and inspect megamoe checkpoints.

  to-hf     megamoe checkpoint (any layout)  → transformers OLMoE directory
  from-hf   transformers OLMoE directory     → new megamoe run (step 0)
  reshard   megamoe checkpoint               → new run with another parallel layout
  upcycle   dense megamoe checkpoint         → new MoE run, experts copied from the FFN
  inspect   print a checkpoint's step, layout, model, config and tensor table

A megamoe source may be a run directory (its latest checkpoint) or a step_* directory.
Outputs are written atomically and never replace an existing path without --overwrite, nor
a run directory that a training job holds. section.key=value overrides may come before or
after the flags.
"""

import argparse
import os
import re
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

OVERRIDE = re.compile(r"\w+(\.\w+)+=.*")


def _bad_flags(args) -> str | None:
    """What is wrong with the flags before anything is read, or None."""
    import math
    if args.command == "to-hf" and not (math.isfinite(args.shard_size_gb) and args.shard_size_gb > 0):
        return f"--shard-size-gb {args.shard_size_gb}: give a positive size (5 is the default)"
    if args.command == "reshard" and args.world_size < 1:
        return f"--world-size {args.world_size}: give the number of ranks the new run will use (1 or more)"
    if args.command == "upcycle" and not 1 <= args.top_k <= args.num_experts:
        return (f"--num-experts {args.num_experts} --top-k {args.top_k}: give 1 <= top-k <= num-experts "
                "(e.g. --num-experts 8 --top-k 2)")
    if hasattr(args, "out"):  # --overwrite replaces the output whole: never the source or a folder holding it
        sources = [args.src]
        if args.command != "from-hf":  # a run directory's checkpoint is its latest step_* directory
            from ..checkpoint.canonical import resolve
            from ..checkpoint.files import CheckpointError
            try:
                sources.append(resolve(args.src))
            except CheckpointError:
                pass  # named when the source is read
        out = args.out.resolve()
        for src in sources:
            if out == src.resolve() or out in src.resolve().parents:
                return (f"{args.out} is {'the source' if out == src.resolve() else 'a folder holding the source'} "
                        f"{src}; write the output elsewhere")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megamoe-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name, help_text, out=True):
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("src", type=Path)
        if out:
            p.add_argument("out", type=Path)
            p.add_argument("--overwrite", action="store_true", help="replace an existing output")
            p.add_argument("--no-progress", action="store_true",
                           help="no progress bars (always none when stderr is not a terminal)")
        return p

    p = command("to-hf", "megamoe checkpoint → transformers OLMoE directory")
    p.add_argument("--expert-layout", choices=["per-expert", "stacked"], default="per-expert",
                   help="per-expert (default): published OLMoE keys, loads in transformers 4.x and 5; "
                        "stacked: transformers 5's own layout")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="default: the checkpoint's")
    p.add_argument("--shard-size-gb", type=float, default=5.0)
    p.add_argument("--drop-expert-bias", action="store_true",
                   help="export a run trained with moe.bias_update_rate without its routers' expert "
                        "biases (transformers' OLMoE has none, so it routes differently)")
    p = command("from-hf", "transformers OLMoE directory → new megamoe run")
    p.add_argument("--config", help="YAML with the new run's data/optim/train/parallel settings "
                                    "(e.g. olmoe-1b-7b-sft); model sizes come from config.json")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="the new run's data/optim/train/parallel settings (after --config)")
    p = command("reshard", "megamoe checkpoint → new run with another parallel layout")
    p.add_argument("overrides", nargs="+", metavar="parallel.key=value")
    p.add_argument("--world-size", type=int, required=True, help="ranks the new run will use")
    p = command("upcycle", "dense megamoe checkpoint → MoE run (experts = copies of the FFN)")
    p.add_argument("--num-experts", type=int, required=True)
    p.add_argument("--top-k", type=int, required=True)
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    p = command("inspect", "print a checkpoint's layout, step, config and tensor table", out=False)
    p.add_argument("--verify", action="store_true", help="check every file's sha256")
    p.add_argument("--no-config", action="store_true")
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if not (hasattr(args, "overrides") and OVERRIDE.fullmatch(a))]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:  # overrides after the flags: argparse matched the overrides positional (empty) before them
        args.overrides += extra
    problem = _bad_flags(args)
    if problem:
        print(f"megamoe-convert: error: {problem}", file=sys.stderr)
        return 2

    from ..checkpoint.files import CheckpointError
    from ..config import ConfigError
    from ..train.rundir import RunLock
    progress = not getattr(args, "no_progress", True) and sys.stderr.isatty()  # no \r lines in logs
    lock = None
    try:
        if getattr(args, "overwrite", False) and args.out.is_dir():
            lock = RunLock(args.out).acquire()  # no job runs there, or starts, until it is replaced
        if args.command == "to-hf":
            from ..checkpoint.hf_dirs import export_hf
            out = export_hf(args.src, args.out, args.expert_layout, args.dtype,
                            int(args.shard_size_gb * 2**30), args.overwrite, progress, args.drop_expert_bias)
        elif args.command == "from-hf":
            from ..checkpoint.hf_dirs import import_hf, refuse_model_overrides
            refuse_model_overrides(args.src, args.overrides)
            out = import_hf(args.src, args.out, args.overrides, args.overwrite, progress, config=args.config)
        elif args.command == "reshard":
            from ..checkpoint.reshard import reshard
            out = reshard(args.src, args.out, args.overrides, args.world_size, args.overwrite, progress)
        elif args.command == "upcycle":
            from ..checkpoint.upcycle import upcycle
            out = upcycle(args.src, args.out, args.num_experts, args.top_k, args.overrides,
                          args.overwrite, progress)
        else:
            from ..checkpoint.summary import describe
            print(describe(args.src, args.verify, not args.no_config))
            return 0
    except (CheckpointError, ConfigError) as e:  # a running job's RunLock refuses with a ConfigError
        print(f"megamoe-convert: error: {e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

