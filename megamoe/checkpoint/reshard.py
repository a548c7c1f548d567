"""Another parallel layout for a checkpoint: checked, then copied to a new run directory.

Checkpoint files are layout-free (pieces with their cuts, optimizer moments per parameter),
so the trainer loads any layout into any other and a run may simply be relaunched with new
`parallel.*` values. `reshard` is that move made explicit and safe: it checks that the new
layout divides the model and the world size, verifies every file's checksum while copying it,
and writes a run directory whose config.yaml has the new layout.
"""

import shutil
from pathlib import Path

import yaml

from .canonical import config_with, resolve
from .files import CheckpointError, atomic_dir, read_meta, verify_file
from .io import LATEST


def reshard(src: Path, out: Path, overrides: list[str], world_size: int, overwrite: bool = False,
            progress: bool = True) -> Path:
    step_dir = resolve(src)
    meta = read_meta(step_dir)
    changed = [o.partition("=")[0] for o in overrides if not o.startswith("parallel.")]
    if changed:
        raise CheckpointError(f"reshard changes the parallel layout only; {', '.join(changed)} would "
                              "change what the checkpoint means (set it when launching, if resumable)")
    cfg = config_with(meta["config"], [*overrides, f"run.dir={Path(out).resolve()}"])
    cfg.validate(world_size)  # a layout that does not divide raises a ConfigError naming the key
    from tqdm import tqdm
    with atomic_dir(Path(out), overwrite) as tmp:
        (tmp / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        dest = tmp / "checkpoints" / step_dir.name
        dest.mkdir(parents=True)
        for name in tqdm(sorted(meta["files"]), desc="copying", unit="file", disable=not progress):
            verify_file(step_dir / name, meta, copy_to=dest / name)
        shutil.copy(step_dir / "meta.json", dest / "meta.json")
        (tmp / "checkpoints" / LATEST).write_text(step_dir.name + "\n")
    return Path(out) / "checkpoints" / step_dir.name
