"""The run directory: created fresh, or continued; never silently overwritten."""

import time
from pathlib import Path

import yaml

from ..config import Config, ConfigError

# Keys that may change between a checkpoint and its continuation: they do not alter what the
# saved state means (more steps, other cadences, other logging). Everything else must match.
RESUMABLE_CHANGES = {"train.steps", "train.log_interval", "train.eval_interval", "train.eval_batches",
                     "train.eval_tasks", "train.eval_limit",
                     "train.save_interval", "train.keep_checkpoints", "train.device",
                     "train.micro_batch_size",  # a new layout may need another to divide the batch
                     "run.dir", "run.tensorboard", "run.sample_prompt", "run.sample_tokens",
                     "data.cache_dir",
                     # checkpoints are layout-free: a run continues in any parallel layout
                     "parallel.tensor", "parallel.pipeline", "parallel.expert", "parallel.zero_stage",
                     "parallel.sequence_parallel", "parallel.pipeline_layers",
                     "parallel.activation_checkpointing"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resumable(saved: dict, cfg: Config, where: Path) -> None:
    """Raise ConfigError naming the first key whose change makes `where` impossible to continue."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise ConfigError(
                f"{key}: the run in {where} used {old.get(key)!r}, this launch asks for "
                f"{new.get(key)!r}; a run cannot continue with a changed {key}. Restore it, "
                "or start a new run with another run.dir (tools/convert_checkpoint.py reshards "
                "a checkpoint to another parallel layout).")


def prepare_run_dir(cfg: Config) -> Path:
    """Check `run.dir` can hold this run and record the resolved config (on one rank).

    A directory with a config.yaml is a megamoe run: it is continued (the config must be
    compatible). A non-empty directory without one is refused. A changed config.yaml is kept
    as config.<time>.yaml before the new one is written.
    """
    run_dir = Path(cfg.run.dir)
    config_file = run_dir / "config.yaml"
    if config_file.is_file():
        check_resumable(yaml.safe_load(config_file.read_text()), cfg, run_dir)
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"run.dir: {run_dir} exists, is not empty and holds no megamoe run "
                          "(no config.yaml); pick a new run.dir so nothing there is overwritten")
    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    if config_file.is_file() and config_file.read_text() != text:
        config_file.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
    config_file.write_text(text)
    return run_dir
