"""The run directory: one job at a time, created fresh or continued; never silently overwritten."""

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

import yaml

from ..checkpoint.io import CheckpointError, recover_checkpoints
from ..config import Config, ConfigError

LOCK = ".lock"

# Keys that may change between a checkpoint and its continuation: they do not alter what the
# saved state means (more steps, other cadences, other logging). Everything else must match.
RESUMABLE_CHANGES = {"train.steps", "train.log_interval", "train.eval_interval", "train.eval_batches",
                     "train.eval_tasks", "train.eval_limit",
                     "train.save_interval", "train.keep_checkpoints", "train.device",
                     "train.micro_batch_size",  # a new layout may need another to divide the batch
                     "train.async_save", "train.collective_timeout_s", "train.overlap_read",
                     "train.gc_interval", "train.fp8_weight_cache", "train.compile", "train.profile_steps",
                     "train.profile_ranks", "train.init_from",
                     "run.dir", "run.tensorboard", "run.sample_prompt", "run.sample_tokens",
                     "data.cache_dir",
                     # checkpoints are layout-free: a run continues in any parallel layout
                     "parallel.tensor", "parallel.pipeline", "parallel.expert", "parallel.zero_stage",
                     "parallel.sequence_parallel", "parallel.pipeline_layers",
                     "parallel.activation_checkpointing"}


class RunLock:
    """`run.dir/.lock`: an exclusive flock held for the job's life, naming its holder.

    The file records host, pid and start time for the refusal message. The kernel drops a
    flock when its process dies, however it dies, so a lock left by a killed job is free and
    is taken over. Where the filesystem offers no flock, a record of this host whose pid is
    not alive is taken over instead.
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        while True:  # until the file we lock is the one at self.path (a releaser may unlink it)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise ConfigError(self._held_by(holder)) from None
            except OSError as e:  # no flock here (some network filesystems): trust a live pid
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                holder = _read(fd)
                if holder and not _dead_here(holder):
                    os.close(fd)
                    raise ConfigError(self._held_by(holder)) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        holder = _read(fd)
        if holder:
            print(f"megamoe: taking over {self.path}, left by a job that is gone "
                  f"({_describe(holder)})", flush=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "start": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        """Remove the file, then drop the lock (closing the descriptor); idempotent."""
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def _held_by(self, holder: dict | None) -> str:
        return (f"run.dir: {self.path.parent} is in use by another job ({_describe(holder)}); "
                "one job at a time may write a run directory. Wait for that job to end or stop "
                "it, or pick another run.dir")


def _read(fd: int) -> dict | None:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "null")
    except (ValueError, UnicodeDecodeError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown: its lock file is being written"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('start')}"


def _dead_here(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resumable(saved: dict, cfg: Config, where: Path) -> None:
    """Raise ConfigError naming the first key whose change makes `where` impossible to continue. A key the
    saved config lacks (a run saved before megamoe had it) counts as its default, which that run ran with."""
    old, new = _flatten(saved), _flatten(cfg.to_dict())
    old = {**{k: v for k, v in _flatten(Config().to_dict()).items() if k not in old}, **old}
    for key in sorted(old.keys() | new.keys()):
        if key not in RESUMABLE_CHANGES and old.get(key) != new.get(key):
            raise ConfigError(
                f"{key}: the run in {where} used {old.get(key)!r}, this launch asks for "
                f"{new.get(key)!r}; a run cannot continue with a changed {key}. Restore it, "
                + ("or reshard the checkpoint to the new layout (megamoe-convert reshard) and continue there."
                   if key.startswith("parallel.") else
                   "or start a new run with another run.dir." if key in _shape_key_names() else
                   f"or start a new run from its weights: another run.dir with train.init_from={where}."))



def _shape_keys(cfg: Config) -> dict:
    """The values that decide a model's tensor shapes, as the keys that set them (derived where a key has a
    default that stands for a size: head_dim, dense_ffn_hidden)."""
    m, moe = cfg.model, cfg.moe
    dense = bool(moe.dense_layers) or not moe.num_experts
    return {"model.vocab_size": m.vocab_size, "model.d_model": m.d_model, "model.n_layers": m.n_layers,
            "model.n_heads": m.n_heads, "model.head_dim": m.dim_per_head, "moe.num_experts": moe.num_experts,
            "moe.ffn_hidden": moe.ffn_hidden, "moe.num_shared_experts": moe.num_shared_experts,
            "moe.dense_layers": sorted(moe.dense_layers) if moe.num_experts else [],
            "moe.dense_ffn_hidden (with moe.top_k)": moe.dense_width() if dense else None}


def _shape_key_names() -> set[str]:
    """The config keys `_shape_keys` reads (moe.top_k among them: the dense width's default)."""
    return {part for key in _shape_keys(Config()) for part in key.replace("(with ", "").rstrip(")").split()}


def check_init_from(cfg: Config) -> Path | None:
    """`train.init_from`'s checkpoint (a step dir), checked to fit this run's model before anything starts; None
    without one, or when `run.dir` holds a checkpoint already (the relaunch resumes it). Raises ConfigError
    naming the first key whose value gives the tensors other shapes."""
    if cfg.train.init_from is None or _has_checkpoint(Path(cfg.run.dir)):
        return None
    from ..checkpoint.canonical import expected_shapes, resolve
    from ..checkpoint.files import read_meta
    from ..config import from_dict
    source = Path(cfg.train.init_from).expanduser()
    try:
        step_dir = resolve(source)
        saved = from_dict(read_meta(step_dir)["config"])
    except (CheckpointError, ConfigError) as e:
        raise ConfigError(f"train.init_from: {e}; give a megamoe run directory or one of its checkpoints/step_* "
                          "directories (megamoe-convert from-hf makes one from transformers)") from None
    shapes = [{n: s for n, s in expected_shapes(c).items() if not n.endswith(".router.expert_bias")}
              for c in (saved, cfg)]
    if shapes[0] != shapes[1]:
        theirs, mine = _shape_keys(saved), _shape_keys(cfg)
        key = next((k for k in mine if theirs[k] != mine[k]), None)
        differ = (f"{key}={theirs[key]!r}, this run's has {mine[key]!r}; set {key.split()[0]} as that model has"
                  if key else "other tensor shapes; set model.* and moe.* as that model has")
        raise ConfigError(f"train.init_from: {step_dir} holds a model with {differ} (the tensors' shapes depend "
                          "on it) or start from another checkpoint")
    return step_dir


def _has_checkpoint(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*"))


def prepare_run_dir(cfg: Config, lock: RunLock) -> Path:
    """Take `lock` (on `run.dir`) for this job, check it can hold this run, record the resolved config.

    Run on one rank (rank 0) before anything else touches the directory. A directory with a
    config.yaml is a megamoe run. With a checkpoint it is continued, and the config must be
    compatible with it; without one nothing in it depends on the config (a launch that
    failed before its first save), so any config may start there. A non-empty directory
    without a config.yaml is refused. A changed config.yaml is kept as config.<time>.yaml
    before the new one is written. The caller releases the lock when the job ends.
    """
    run_dir = Path(cfg.run.dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run.dir: {run_dir} is a file, not a directory; pick another run.dir")
    _refuse_foreign(run_dir, locked=False)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except OSError as e:
        raise ConfigError(f"run.dir: cannot write {run_dir} ({e.strerror}); pick a run.dir this "
                          "user may write, or fix its permissions") from None
    try:
        _refuse_foreign(run_dir, locked=True)
        config_file = run_dir / "config.yaml"
        try:
            latest = recover_checkpoints(run_dir / "checkpoints")
        except CheckpointError as e:  # as a ConfigError, every rank reports it (_rank0_then_all)
            raise ConfigError(f"run.dir: {e}") from None
        if latest is not None and config_file.is_file():
            saved = _read_yaml(config_file)
            if saved is not None:  # a damaged one is kept aside below; the checkpoint's own config is checked
                check_resumable(saved, cfg, run_dir)
        reached = int(latest.name.split("_")[-1]) if latest is not None else 0
        if reached > cfg.train.steps:  # before config.yaml says fewer steps than the run has
            raise ConfigError(f"train.steps: the run in {run_dir} is at step {reached} already, past "
                              f"train.steps={cfg.train.steps}; give train.steps above {reached} to continue it, "
                              "or another run.dir (with train.init_from to start from its weights)")
        text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
        if config_file.is_file() and config_file.read_text() != text:
            config_file.rename(run_dir / f"config.{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        config_file.write_text(text)
        (run_dir / "checkpoints").mkdir(exist_ok=True)
    except BaseException:
        lock.release()
        raise
    return run_dir


def _read_yaml(path: Path) -> dict | None:
    """A config.yaml's mapping, or None when it is damaged (not UTF-8 YAML holding a mapping)."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError):
        return None
    return data if isinstance(data, dict) else None


def _refuse_foreign(run_dir: Path, locked: bool) -> None:
    """A non-empty directory without config.yaml is not a megamoe run: refuse it. Before the
    lock is ours, one holding a lock file is left to the lock to judge (a job starting there)."""
    if not run_dir.is_dir() or (run_dir / "config.yaml").is_file():
        return
    names = {p.name for p in run_dir.iterdir()}
    if names - {LOCK} and (locked or LOCK not in names):
        raise ConfigError(f"run.dir: {run_dir} exists, is not empty and holds no megamoe run "
                          "(no config.yaml); pick a new run.dir so nothing there is overwritten")
