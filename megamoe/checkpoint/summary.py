"""A checkpoint in words: step, layout, model, files and the table of its tensors."""

from pathlib import Path

import torch
import yaml

from .canonical import resolve
from .files import ShardedReader, read_meta, verify_file


def describe(src: Path, verify: bool = False, show_config: bool = True) -> str:
    step_dir = resolve(src)
    meta = read_meta(step_dir)
    if verify:
        for name in meta["files"]:
            verify_file(step_dir / name, meta)
    cfg, lay = meta["config"], meta["layout"]
    m, moe = cfg["model"], cfg["moe"]
    size = sum((step_dir / f).stat().st_size for f in meta["files"] if (step_dir / f).is_file())
    opt = meta.get("optimizer") or {}
    lines = [f"checkpoint  {step_dir}",
             f"step        {meta['step']} (optimizer step {opt.get('step', 0)}{'' if opt else ': no optimizer state'})",
             f"layout      world {meta['world_size']}: tp {lay['tp']} · pp {lay['pp']} · ep {lay['ep']} · "
             f"dp {lay['dp']} · zero {lay.get('zero_stage', 0)} (loads into any layout)",
             f"model       {m['n_layers']} layers · d_model {m['d_model']} · {m['n_heads']} heads · vocab "
             f"{m['vocab_size']} · " + (f"{moe['num_experts']} experts top-{moe['top_k']}" if moe["num_experts"]
                                          else "dense FFN") + f" · ffn {moe['ffn_hidden']}",
             f"files       {len(meta['files'])}, {size / 2**20:.1f} MiB, sha256 "
             f"{'verified' if verify else 'recorded (--verify checks them)'}"]
    with ShardedReader(step_dir, meta, "model") as reader:
        rows = [(n, reader.full_shapes[n], reader.dtypes[n], len(reader.pieces[n])) for n in reader.names()]
    total = sum(torch.Size(s).numel() for _, s, _, _ in rows)
    width = max(len(n) for n, *_ in rows)
    lines += ["", f"{'tensor':<{width}}  {'shape':<18} dtype  pieces"]
    lines += [f"{n:<{width}}  {str(list(s)):<18} {d:<6} {p}" for n, s, d, p in rows]
    lines += [f"{len(rows)} tensors, {total / 1e6:.2f}M parameters"]
    if show_config:
        lines += ["", "config:", yaml.safe_dump(cfg, sort_keys=False).rstrip()]
    return "\n".join(lines)
