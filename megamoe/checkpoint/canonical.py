"""The layout-free form: full tensors by canonical name, read from or written as a checkpoint.

Reading streams one full tensor at a time from the pieces of any layout (`iter_canonical`);
writing (`write_run`) makes a new run directory whose step checkpoint holds full tensors in
parts of bounded size, with no optimizer state: the trainer resumes from it in any layout.
"""

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from .files import CheckpointError, ShardedReader, atomic_dir, read_meta
from .io import LATEST, latest_checkpoint, step_dir_name, write_meta, write_tensors


def resolve(path: Path) -> Path:
    """A step checkpoint directory from a run dir (its latest checkpoint) or a step dir."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} has no checkpoint yet (no checkpoints/latest)")
        return found
    if not path.exists():
        near = path.parent if path.parent.is_dir() else None
        steps = sorted(p.name for p in near.glob("step_*")) if near is not None else []
        raise CheckpointError(f"{path} does not exist" + (f" (beside it: {', '.join(steps[-5:])})" if steps else "")
                              + "; give a run directory or one of its checkpoints/step_* folders")
    raise CheckpointError(f"{path} is neither a megamoe run directory nor a step_* checkpoint")


def iter_canonical(path: Path, progress: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor), one at a time, from checkpoint `path` (run dir or step dir)."""
    path = resolve(path)
    meta = read_meta(path)
    with ShardedReader(path, meta, "model") as reader:
        names = reader.names()
        for name in tqdm(names, desc=f"reading {path.name}", unit="tensor", disable=not progress):
            yield name, reader.read(name)


def load_canonical(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(full tensors by name, meta) of checkpoint `path` (run dir or step dir)."""
    path = resolve(path)
    return dict(iter_canonical(path)), read_meta(path)


def config_with(base: dict, overrides):
    """The Config of `base` (a saved config dict) with `section.key=value` overrides applied."""
    from ..config import with_overrides
    return with_overrides(base, overrides)


def expected_shapes(cfg) -> dict[str, tuple]:
    """Full shape of every tensor (parameters, persistent buffers) of the 1-rank model `cfg`
    describes (nothing allocated)."""
    with torch.device("meta"):
        model = cfg.model.build(cfg.moe)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def write_run(run_dir: Path, cfg, tensors: Iterable[tuple[str, torch.Tensor]], step: int = 0,
              overwrite: bool = False, part_bytes: int = 1 << 30) -> Path:
    """A new run directory (config.yaml + checkpoints/step_*/) holding `tensors` at `step`.

    Tensors are streamed into parts of about `part_bytes`; their names and shapes must be
    exactly those of the model `cfg` describes. Written atomically; returns the step dir.
    """
    cfg.run.dir = str(Path(run_dir).resolve())  # where it is, from whatever directory it is launched
    cfg.train.init_from = None  # it starts from the checkpoint written here
    cfg.validate()
    shapes = expected_shapes(cfg)
    seen: set[str] = set()
    with atomic_dir(Path(run_dir), overwrite) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        step_dir = tmp / "checkpoints" / step_dir_name(step)
        step_dir.mkdir(parents=True)
        digests, part, size = {}, {}, 0

        def flush():
            nonlocal part, size
            if part:
                digests.update(write_tensors(step_dir / f"model-part{len(digests):05d}.safetensors",
                                             part, {k: [] for k in part}))
            part, size = {}, 0

        for name, t in tensors:
            if name not in shapes or tuple(t.shape) != shapes[name]:
                raise CheckpointError(f"tensor {name} {list(t.shape)} does not fit the model the config "
                                      f"describes ({list(shapes[name]) if name in shapes else 'no such tensor'}): "
                                      "a model.* or moe.* setting given differs from the source's; drop or "
                                      "correct that override")
            seen.add(name)
            part[name] = t.contiguous()
            size += t.numel() * t.element_size()
            if size >= part_bytes:
                flush()
        for name in sorted(set(shapes) - seen):  # dense, upcycled and transformers models have none:
            if name.endswith(".router.expert_bias"):  # the aux-loss-free bias starts at zero
                part[name] = torch.zeros(shapes[name])
                seen.add(name)
        flush()
        missing = sorted(set(shapes) - seen)
        if missing:
            raise CheckpointError(f"the source has no tensor for {missing[:4]} ({len(missing)} missing); "
                                  "its config does not match its tensors")
        write_meta(step_dir, step, cfg.to_dict(), {"tp": 1, "pp": 1, "ep": 1, "dp": 1, "zero_stage": 0},
                   1, digests, 0)
        (tmp / "checkpoints" / LATEST).write_text(step_dir.name + "\n")
    return Path(run_dir) / "checkpoints" / step_dir_name(step)
