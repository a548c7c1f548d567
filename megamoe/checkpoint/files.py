"""Checkpoint files: meta.json, checksums, atomic directories, and reading any piece of any tensor.

A checkpoint directory holds safetensors files whose tensors are *pieces* of full tensors:
each file's metadata records, per tensor, the cuts `[(dim, index, count), ...]` (first cut
outermost) that made the piece from the full tensor. Which rank or tool wrote a file does not
matter: `ShardedReader` indexes every piece by the box of the full tensor it covers and reads
any box (a full tensor, or one rank's shard of another layout) from the pieces that overlap it.
"""

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

META = "meta.json"
FORMAT = 2  # 2: layout-free optimizer state (optim-*.safetensors), RNG in rng-*.safetensors


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; the message names it."""


_UMASK = os.umask(0o022)  # read once, at import: setting it is process-wide (async saves write
os.umask(_UMASK)          # from a thread), so it is never touched again


def save_safetensors(tensors: dict, path: Path, metadata: dict) -> None:
    """safetensors' `save_file`, with the permissions of any other new file (it makes them 600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~_UMASK)


def sha256(path: Path, copy_to: Path | None = None) -> str:
    """The file's sha256, read in 16 MiB chunks; with `copy_to`, each chunk is also written
    there, so a verified copy reads the file once."""
    h = hashlib.sha256()
    with open(path, "rb") as f, open(copy_to, "wb") if copy_to else contextlib.nullcontext() as out:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
            if out is not None:
                out.write(chunk)
    return h.hexdigest()


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / META
    try:
        meta = json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: {path} is not a megamoe checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); restore it or pick another checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_file} is corrupt (not a JSON object); restore it or pick another checkpoint")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {meta.get('format', 1)}; this megamoe "
                              f"reads format {FORMAT} (layout-free optimizer state)")
    if not isinstance(meta.get("files"), dict):
        raise CheckpointError(f"{meta_file} has no 'files' (the sha256 of every file in {path}): it is "
                              "damaged; restore it, or resume from another checkpoint")
    lacks = [k for k in ("step", "world_size", "layout", "config") if k not in meta]
    if lacks:
        raise CheckpointError(f"{meta_file} lacks {', '.join(lacks)}: it is damaged; restore it, or resume "
                              "from another checkpoint")
    return meta


def verify_file(path: Path, meta: dict, copy_to: Path | None = None) -> None:
    """The file exists and has the sha256 meta.json recorded for it; with `copy_to`, it is
    copied there while it is read."""
    expected = meta["files"].get(path.name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    if expected is None:
        raise CheckpointError(f"checkpoint file {path} is not listed in {path.parent / META}")
    if sha256(path, copy_to) != expected:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (sha256 mismatch); "
                              "restore it from a copy or resume from an earlier checkpoint")


@contextlib.contextmanager
def atomic_dir(final: Path, overwrite: bool = False):
    """Yield a temporary sibling of `final`; it becomes `final` only if the block succeeds.

    An existing `final` is refused unless `overwrite`, and then replaced only at the end.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise CheckpointError(f"{final} already exists; pass --overwrite to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for f in tmp.rglob("*"):  # durable before it appears under its name
        fsync_path(f)
    fsync_path(tmp)
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:  # --overwrite of a file (or a link) by a directory
            old.unlink()
    else:
        os.replace(tmp, final)
    fsync_path(final.parent)


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def piece_box(shape, cuts) -> tuple[tuple[int, int], ...]:
    """(offset, size) per dim of the full tensor that a piece of `shape` cut by `cuts` covers."""
    full = _full_from(shape, cuts)
    offset, size = [0] * len(full), list(full)
    for dim, index, count in cuts:  # first cut outermost
        size[dim] //= count
        offset[dim] += index * size[dim]
    return tuple(zip(offset, size))


def full_shape_of(box) -> tuple[int, ...]:
    return tuple(size for _, size in box)


class ShardedReader:
    """Every piece of every tensor in a checkpoint's `<prefix>-*.safetensors` files.

    Files are opened lazily and checksum-verified before their first tensor is read.
    Use as a context manager (it keeps the files it opened open).
    """

    def __init__(self, path: Path, meta: dict, prefix: str = "model"):
        self.path, self.meta = Path(path), meta
        self.pieces: dict[str, dict[tuple, tuple[str, tuple]]] = {}  # name -> {box: (file, full shape)}
        self.full_shapes: dict[str, tuple] = {}
        self.dtypes: dict[str, str] = {}
        self._open: dict[str, object] = {}
        self._stack = contextlib.ExitStack()
        files = sorted(f for f in meta["files"] if f.startswith(prefix + "-") and f.endswith(".safetensors"))
        for name in files:
            for key, (shape, dtype, cuts) in self._header(name).items():
                box = piece_box(shape, cuts)
                full = tuple(_full_from(shape, cuts))
                if self.full_shapes.setdefault(key, full) != full:
                    raise CheckpointError(f"{self.path / name}: tensor {key} is a piece of a {list(full)} "
                                          f"tensor, other files say {list(self.full_shapes[key])}")
                self.pieces.setdefault(key, {}).setdefault(box, name)
                self.dtypes[key] = dtype

    def _header(self, name: str) -> dict:
        f = self.path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; the checkpoint is incomplete")
        try:
            with safe_open(str(f), framework="pt") as sf:
                cuts = json.loads((sf.metadata() or {}).get("shards", "{}"))
                return {k: (sf.get_slice(k).get_shape(), sf.get_slice(k).get_dtype(), cuts.get(k, []))
                        for k in sf.keys()}
        except Exception as e:  # safetensors raises its own error type for truncated headers
            raise CheckpointError(f"checkpoint file {f} is corrupt or truncated ({e}); restore it "
                                  "from a copy or resume from an earlier checkpoint") from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()

    def names(self) -> list[str]:
        return list(self.pieces)

    def _file(self, name: str):
        if name not in self._open:
            f = self.path / name
            verify_file(f, self.meta)
            self._open[name] = self._stack.enter_context(safe_open(str(f), framework="pt"))
        return self._open[name]

    def read(self, key: str, box=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """The part `box` ((offset, size) per dim; None = all) of full tensor `key`."""
        if key not in self.pieces:
            raise CheckpointError(f"{self.path} has no tensor {key!r}")
        full = self.full_shapes[key]
        box = box or tuple((0, s) for s in full)
        covered = 0
        for piece, name in self.pieces[key].items():
            lo = [max(o, po) for (o, _), (po, _) in zip(box, piece)]
            hi = [min(o + s, po + ps) for (o, s), (po, ps) in zip(box, piece)]
            if any(h <= l for l, h in zip(lo, hi)):
                continue
            part = self._file(name).get_slice(key)[tuple(slice(l - po, h - po) for l, h, (po, _) in zip(lo, hi, piece))]
            if out is None:
                out = torch.empty(full_shape_of(box), dtype=part.dtype)
            out[tuple(slice(l - o, h - o) for l, h, (o, _) in zip(lo, hi, box))] = part
            covered += part.numel()
        if out is None or covered != out.numel():
            raise CheckpointError(f"{self.path}: the pieces of {key} found in its files cover "
                                  f"{covered} of the {torch.Size(full_shape_of(box)).numel()} elements "
                                  "asked for: a shard file is missing")
        return out


def _full_from(shape, cuts) -> list[int]:
    full = list(shape)
    for dim, _, count in cuts:
        full[dim] *= count
    return full
