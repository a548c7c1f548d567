"""The layout-free form: full tensors by canonical name, assembled from any checkpoint."""

from pathlib import Path

import torch

from .io import CheckpointError, read_meta, read_rank_tensors


def assemble(pieces: list[tuple[torch.Tensor, list]]) -> torch.Tensor:
    """Full tensor from its distinct shards; each piece is (tensor, [(dim, index, count), ...])."""
    if len(pieces) == 1 and not pieces[0][1]:
        return pieces[0][0]
    # Recursively concatenate along the outermost cut (the first recorded).
    dim, _, count = pieces[0][1][0]
    groups: dict[int, list] = {}
    for t, spec in pieces:
        d, index, c = spec[0]
        assert (d, c) == (dim, count), "inconsistent shard specs"
        groups.setdefault(index, []).append((t, spec[1:]))
    if sorted(groups) != list(range(count)):
        raise CheckpointError(f"shards {sorted(groups)} of {count} along dim {dim}: some are missing")
    return torch.cat([assemble(groups[i]) for i in range(count)], dim=dim)


def load_canonical(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full tensors by name, meta) of the checkpoint directory `path`."""
    meta = read_meta(path)
    pieces: dict[str, dict[tuple, tuple]] = {}
    for rank in range(meta["world_size"]):
        f = Path(path) / f"model-rank{rank:05d}.safetensors"
        if not f.exists():
            continue  # ranks that own no unique shard still write (empty) files; tolerate none
        tensors, specs = read_rank_tensors(path, rank, meta)
        for name, t in tensors.items():
            spec = [tuple(s) for s in specs[name]]
            pieces.setdefault(name, {})[tuple(spec)] = (t, spec)
    return {name: assemble(list(p.values())) for name, p in pieces.items()}, meta
