"""Publishing a run's checkpoints: durable writes, in a background thread, then one atomic rename.

`save_checkpoint` (io.py) takes each rank's copy of its state in host memory, in the training
thread, with every collective it needs; a `CheckpointWriter` then writes it. Each rank writes and
fsyncs its files into the step's temporary directory and leaves a marker holding their sha256.
Rank 0 waits for every rank's marker (no collective: the training threads have moved on), writes
meta.json, fsyncs, renames the directory to `step_*`, moves `latest` to it and prunes. Ranks meet
only through the filesystem that the checkpoint directory needs to be shared on anyway.

Pruning keeps `keep` checkpoints among those this run may delete: the ones it wrote, and the ones
at or before the step it resumed from (its own history). A checkpoint newer than the resume point
that this job did not write (the user pointed `latest` back to an older one) is never deleted.
"""

import json
import os
import re
import shutil
import threading
import time
from pathlib import Path

from .files import META, CheckpointError, fsync_path

LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d+)")
STALE = (".step_*.tmp-*", f".{LATEST}.tmp")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def write_durably(path: Path, text: str) -> None:
    """Replace `path` by `text` atomically and durably (write aside, fsync, rename, fsync dir)."""
    tmp = path.parent / f".{path.name}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def is_complete(step_dir: Path) -> bool:
    """A step directory whose meta.json reads and lists files that all exist."""
    try:
        files = json.loads((step_dir / META).read_text())["files"]
        return isinstance(files, dict) and all((step_dir / f).is_file() for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def step_dirs(ckpt_root: Path) -> dict[int, Path]:
    """{step: directory} of every `step_*` directory, complete or not."""
    found = {}
    for p in Path(ckpt_root).glob("step_*"):
        m = STEP_DIR.fullmatch(p.name)
        if m and p.is_dir():
            found[int(m[1])] = p
    return found


def newest_complete(ckpt_root: Path) -> Path | None:
    done = [s for s, p in step_dirs(ckpt_root).items() if is_complete(p)]
    return step_dirs(ckpt_root)[max(done)] if done else None


def recover(ckpt_root: Path) -> None:
    """At the start of a job that holds the run's lock: remove the temporary folders of killed
    writes, and rebuild a missing or dangling `latest` from the newest complete checkpoint."""
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return
    for pattern in STALE:
        for stale in ckpt_root.glob(pattern):
            print(f"megamoe: removing {stale}, left by a save that did not finish", flush=True)
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    pointer = ckpt_root / LATEST
    named = pointer.read_text().strip() if pointer.is_file() else None
    if named and (ckpt_root / named / META).is_file():
        return
    steps = step_dirs(ckpt_root)
    if not steps:
        return
    newest = newest_complete(ckpt_root)
    if newest is None:
        raise CheckpointError(f"{ckpt_root} holds {len(steps)} step_* directories but no complete "
                              "checkpoint (meta.json and every file it lists); restore one, or move "
                              "them away to start the run over")
    why = f"points to {named}, which is not a checkpoint" if named else "is missing"
    print(f"megamoe: {pointer} {why}; pointing it at the newest complete checkpoint, {newest.name}",
          flush=True)
    write_durably(pointer, newest.name + "\n")


def publish(ckpt_root: Path, tmp: Path, final: Path) -> None:
    """Rename the complete, fsynced checkpoint `tmp` to `final`, then move `latest` to it."""
    fsync_path(tmp)
    old = None
    if final.exists():  # a re-save of the same step (a run resumed before it): replace it whole
        old = tmp.with_name(tmp.name + "-replaced")  # a stale name: removed at start if we die here
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_path(ckpt_root)
    if old is not None:
        shutil.rmtree(old)
    write_durably(ckpt_root / LATEST, final.name + "\n")


class CheckpointWriter:
    """Writes one run's checkpoints on this rank: in a background thread when `background`.

    `submit` starts a save after the previous one finished; `wait` blocks until the save in
    flight is written (on rank 0: published) and raises the error of one that failed.
    """

    def __init__(self, ckpt_root: Path, rank: int, world_size: int, keep: int = 0,
                 resume_step: int = 0, background: bool = False, timeout_s: float = 1800.0):
        self.root, self.rank, self.world_size = Path(ckpt_root), rank, world_size
        self.keep, self.resume_step, self.background, self.timeout_s = keep, resume_step, background, timeout_s
        self.written: set[int] = set()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, step: int, tmp: Path, write_files, meta: dict) -> None:
        """Write `step` into `tmp`: `write_files()` writes this rank's files and returns
        {file name: sha256}; rank 0 completes `meta` with every rank's and publishes."""
        self.wait()
        job = (step, tmp, write_files, meta)
        if not self.background:
            self._run(*job)
            return self.wait()
        self._thread = threading.Thread(target=self._run, args=job, name=f"megamoe-save-{step}", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _run(self, step: int, tmp: Path, write_files, meta: dict) -> None:
        try:
            digests = write_files()
            if self.rank != 0:
                write_durably(tmp / f".done-rank{self.rank:05d}.json", json.dumps(digests))
                return
            for d in self._peers(tmp, step):
                digests |= d
            write_durably(tmp / META, json.dumps(dict(meta, files=digests), indent=1))
            publish(self.root, tmp, self.root / step_dir_name(step))
            self.written.add(step)
            if self.keep:
                self._prune()
        except BaseException as e:  # noqa: BLE001 - reported by wait(), in the training thread
            self._error = e if isinstance(e, CheckpointError) else CheckpointError(
                f"writing checkpoint {step_dir_name(step)} failed on rank {self.rank}: {e!r}")
            if self.rank != 0:  # rank 0 waits for this rank's files: tell it they will not come
                try:
                    (tmp / f".failed-rank{self.rank:05d}").write_text(str(self._error))
                except OSError:
                    pass

    def _peers(self, tmp: Path, step: int) -> list[dict]:
        """Every other rank's {file: sha256}, once its files are written (polls `tmp`)."""
        deadline, found = time.monotonic() + self.timeout_s, {}
        while len(found) < self.world_size - 1:
            for r in range(1, self.world_size):
                if r in found:
                    continue
                failed = tmp / f".failed-rank{r:05d}"
                if failed.exists():
                    raise CheckpointError(failed.read_text())
                done = tmp / f".done-rank{r:05d}.json"
                if done.is_file():
                    found[r] = json.loads(done.read_text())
                    done.unlink()
            if len(found) < self.world_size - 1:
                if time.monotonic() > deadline:
                    missing = sorted(set(range(1, self.world_size)) - set(found))
                    raise CheckpointError(
                        f"checkpoint {step_dir_name(step)}: ranks {missing} did not write their files "
                        f"into {tmp} within {self.timeout_s:.0f} s; run.dir must be on a filesystem "
                        "that every node shares")
                time.sleep(0.05)
        return list(found.values())

    def _prune(self) -> None:
        ours = {s: p for s, p in step_dirs(self.root).items()
                if (s <= self.resume_step or s in self.written) and is_complete(p)}
        for s in sorted(ours)[:-self.keep]:
            shutil.rmtree(ours[s], ignore_errors=True)
