"""Distributed checkpoints: save, verify, resume.

Layout of `run.dir/checkpoints/step_00000100/`:
  meta.json                       step, config, layout, per-file sha256
  model-rank00003.safetensors     this rank's *unique* local tensors, named canonically, with
                                  their shard specs (dim, index, count) in the file metadata
  optim-rank00003.pt              optimizer state + RNG states of that rank (tensors only,
                                  read back with torch.load(weights_only=True))
Dense tensors are written by data-parallel rank 0 of each (tp, pp) coordinate, expert tensors
by expert-data-parallel rank 0, so every full tensor is assembled from exactly one copy of each
shard. A checkpoint appears atomically: written under a temporary name, renamed when complete,
then the `latest` pointer file is replaced.
"""

import hashlib
import json
import os
import random
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..parallel.sharding import shards

LATEST = "latest"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; the message names it."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    pointer = Path(ckpt_root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(ckpt_root) / pointer.read_text().strip()
    if not (path / "meta.json").is_file():
        raise CheckpointError(f"{pointer} points to {path}, which is not a complete checkpoint; "
                              "point it at an existing step_* directory or remove it to start over")
    return path


def _owns(param: torch.nn.Parameter, state) -> bool:
    """Whether this rank writes `param`: one copy of every distinct shard across the world."""
    is_expert = getattr(param, "allreduce", True) is False
    return (state.edp_rank if is_expert else state.dp_rank) == 0


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _rng_state() -> dict:
    """Every RNG this process draws from, as tensors and plain numbers (weights_only-safe)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                       "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
             "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                        "gauss": py_gauss}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["gauss"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module, optimizer, state,
                    extra: dict, keep: int | None = None) -> Path:
    """Collective: every rank writes its files; rank 0 publishes the directory atomically."""
    ckpt_root = Path(ckpt_root)
    final = ckpt_root / step_dir_name(step)
    tmp_name = [f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = ckpt_root / tmp_name[0]
    tmp.mkdir(parents=True, exist_ok=True)
    r = state.rank

    tensors, specs = {}, {}
    for name, p in _named_params(model):
        if _owns(p, state):
            tensors[name] = p.detach().to("cpu").contiguous()
            specs[name] = shards(p)
    model_file = tmp / f"model-rank{r:05d}.safetensors"
    save_file(tensors, str(model_file), metadata={"shards": json.dumps(specs)})
    optim_file = tmp / f"optim-rank{r:05d}.pt"
    torch.save({"optimizer": _portable(optimizer.state_dict()), "rng": _rng_state()}, optim_file)
    digests = {model_file.name: _sha256(model_file), optim_file.name: _sha256(optim_file)}

    all_digests = [None] * state.world_size if dist.is_initialized() else [digests]
    if dist.is_initialized():
        dist.all_gather_object(all_digests, digests)
    if r == 0:
        meta = dict(extra, step=step, world_size=state.world_size,
                    layout={"tp": state.tp, "pp": state.pp, "ep": state.ep, "dp": state.dp},
                    files={k: v for d in all_digests for k, v in d.items()})
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        if final.exists():  # a re-save of the same step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer_tmp = ckpt_root / f".{LATEST}.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, ckpt_root / LATEST)
        if keep:
            _prune(ckpt_root, keep)
    if dist.is_initialized():
        dist.barrier()
    return final


def _prune(ckpt_root: Path, keep: int) -> None:
    steps = sorted(p for p in ckpt_root.glob("step_*") if p.is_dir())
    for old in steps[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _named_params(model):
    for name, p in model.named_parameters():
        yield name.removeprefix("module."), p


# Entries of DeepSpeed's ZeRO optimizer state that describe the layout or the (static) loss
# scaler rather than training progress. They are Python objects that weights_only loading
# refuses, so they are not saved; on load the live optimizer supplies its own.
_DERIVED_KEYS = ("loss_scaler", "param_slice_mappings", "zero_stage")


def _portable(state_dict: dict) -> dict:
    return _to_cpu({k: v for k, v in state_dict.items() if k not in _DERIVED_KEYS})


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def read_meta(path: Path) -> dict:
    meta_file = Path(path) / "meta.json"
    try:
        return json.loads(meta_file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_file} is missing: {path} is not a megamoe checkpoint") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_file} is corrupt ({e}); restore it or pick another checkpoint") from None


def verify_file(path: Path, meta: dict) -> None:
    expected = meta["files"].get(path.name)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    if expected is not None and _sha256(path) != expected:
        raise CheckpointError(f"checkpoint file {path} is corrupt or truncated (sha256 mismatch); "
                              "restore it from a copy or resume from an earlier checkpoint")


def read_rank_tensors(path: Path, rank: int, meta: dict) -> tuple[dict, dict]:
    """(tensors, shard specs) written by one rank, checksum-verified."""
    f = Path(path) / f"model-rank{rank:05d}.safetensors"
    verify_file(f, meta)
    with safe_open(str(f), framework="pt") as sf:
        specs = json.loads(sf.metadata()["shards"])
        return {k: sf.get_tensor(k) for k in sf.keys()}, specs


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, state) -> dict:
    """Restore this rank's parameters, optimizer and RNG from a checkpoint of the same layout."""
    path = Path(path)
    meta = read_meta(path)
    layout = {"tp": state.tp, "pp": state.pp, "ep": state.ep, "dp": state.dp}
    if meta["layout"] != layout:
        raise CheckpointError(
            f"{path} was saved with layout {meta['layout']} but this run is {layout}; resume with "
            "the same parallel layout, or reshard it with tools/convert_checkpoint.py")
    params = dict(_named_params(model))
    needed = {n for n in params}
    found: dict[str, torch.Tensor] = {}
    for r in _source_ranks(state):
        tensors, _ = read_rank_tensors(path, r, meta)
        found.update({k: v for k, v in tensors.items() if k in needed and k not in found
                      and _same_shard(params[k], r, state)})
    missing = needed - found.keys()
    if missing:
        raise CheckpointError(f"{path} lacks tensors {sorted(missing)[:5]}...: it does not match this model")
    with torch.no_grad():
        for name, p in params.items():
            if found[name].shape != p.shape:
                raise CheckpointError(f"{path}: tensor {name} has shape {tuple(found[name].shape)}, "
                                      f"the model expects {tuple(p.shape)}")
            p.copy_(found[name])
    optim_file = path / f"optim-rank{state.rank:05d}.pt"
    verify_file(optim_file, meta)
    blob = torch.load(optim_file, map_location="cpu", weights_only=True)
    _load_optimizer(optimizer, blob["optimizer"])
    _set_rng_state(blob["rng"])
    return meta


def _load_optimizer(optimizer, saved: dict) -> None:
    live = optimizer.state_dict()
    saved.update({k: live[k] for k in _DERIVED_KEYS if k in live})
    if hasattr(optimizer, "dp_process_group"):  # DeepSpeed's ZeRO / bf16 wrappers
        # They take every data-parallel rank's state and pick their own; ours is the same
        # layout, so this rank's state is all they need (fp32 master weights restored exactly).
        rank = dist.get_rank(group=optimizer.dp_process_group)
        optimizer.load_state_dict(state_dict_list={rank: saved}, load_optimizer_states=True,
                                  load_from_fp32_weights=True)
    else:
        optimizer.load_state_dict(saved)


def _source_ranks(state) -> list[int]:
    """Ranks whose files hold this rank's shards: the dp-rank-0 twin (dense) and edp-rank-0 twin."""
    dense = state._rank_of(state.pp_rank, 0, state.tp_rank)
    expert = state._rank_of(state.pp_rank, state.ep_rank, state.tp_rank)
    return sorted({dense, expert})


def _same_shard(param, writer_rank: int, state) -> bool:
    is_expert = getattr(param, "allreduce", True) is False
    writer_dp = (writer_rank // state.tp) % state.dp
    return (writer_dp % state.ep == state.ep_rank) if is_expert else writer_dp == 0
