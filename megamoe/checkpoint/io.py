"""Distributed checkpoints: every layout saves layout-free files; any layout loads them.

Layout of `run.dir/checkpoints/step_00000100/`:
  meta.json                     format, step, config, layout, optimizer step, sha256 per file
  model-rank00003.safetensors   this rank's *unique* parameter shards under canonical names, in
                                the optimizer's precision (the fp32 master weights under bf16),
                                with their cuts (dim, index, count) in the file metadata
  optim-rank00003.safetensors   the same shards' Adam moments, `<name>.exp_avg` / `<name>.exp_avg_sq`
  rng-rank00003.safetensors     every RNG of that rank (restored only by a same-layout resume)
Dense tensors are written by data-parallel rank 0 of each (tp, pp) coordinate, expert tensors
by expert-data-parallel rank 0, tensors that tensor parallelism replicates by tp rank 0 only:
one copy of every distinct piece. Loading reads, for each local parameter, the box of the full
tensor it covers from whichever pieces overlap it (`files.ShardedReader`), so a checkpoint of any
TP/PP/EP/DP/ZeRO layout resumes in any other. A checkpoint appears atomically and durably:
written and fsynced under a temporary name, renamed when complete, then the `latest` pointer file
is replaced (writer.py, which can do all of it in a background thread).
"""

import json
import random
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open

from ..deepspeed_adapter import link_fragments, partitioned
from ..sharding import full_shape, shards
from .files import (FORMAT, CheckpointError, ShardedReader, fsync_path, piece_box, read_meta, save_safetensors,
                    sha256, verify_file)
from .writer import LATEST, CheckpointWriter, newest_complete, recover, step_dir_name

__all__ = ["CheckpointError", "CheckpointWriter", "latest_checkpoint", "load_checkpoint", "read_meta",
           "recover_checkpoints", "save_checkpoint"]

MOMENTS = ("exp_avg", "exp_avg_sq")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint `latest` names; where it is missing or dangling, the newest complete one."""
    pointer = Path(ckpt_root) / LATEST
    if pointer.is_file():
        path = Path(ckpt_root) / pointer.read_text().strip()
        if (path / "meta.json").is_file():
            return path
    return newest_complete(ckpt_root)


def recover_checkpoints(ckpt_root: Path) -> Path | None:
    """At the start of the job holding the run's lock (rank 0): clean up what killed saves left,
    repair `latest`; returns the checkpoint the run continues from (None: a new run)."""
    recover(ckpt_root)
    return latest_checkpoint(ckpt_root)


def meta_record(step: int, config: dict, layout: dict, world_size: int, files: dict,
                optimizer_step: int) -> dict:
    return dict(format=FORMAT, step=step, config=config, world_size=world_size, layout=layout,
                optimizer={"step": optimizer_step} if optimizer_step else None, files=files)


def write_meta(directory: Path, step: int, config: dict, layout: dict, world_size: int,
               files: dict, optimizer_step: int) -> None:
    meta = meta_record(step, config, layout, world_size, files, optimizer_step)
    (directory / "meta.json").write_text(json.dumps(meta, indent=1))


def write_tensors(path: Path, tensors: dict, cuts: dict, metadata_key: str = "shards") -> dict:
    """One fsynced safetensors file of pieces (`cuts` in its metadata); returns {name: sha256}."""
    save_safetensors(tensors, path, metadata={metadata_key: json.dumps(cuts)})
    fsync_path(path)
    return {path.name: sha256(path)}


def _owns(param: torch.nn.Parameter, state) -> bool:
    """Whether this rank writes `param`: one copy of every distinct shard across the world."""
    is_expert = getattr(param, "allreduce", True) is False
    tp_cut = getattr(param, "tensor_model_parallel", False)
    return (state.edp_rank if is_expert else state.dp_rank) == 0 and (tp_cut or state.tp_rank == 0)


def _named_params(model):
    """Parameters, then persistent buffers (routers' expert biases): model state by canonical
    name; a tensor without gradient has no optimizer moments."""
    persistent = model.state_dict(keep_vars=True)
    tensors = [*model.named_parameters(), *((n, b) for n, b in model.named_buffers() if n in persistent)]
    for name, p in tensors:
        yield name.removeprefix("module."), p


def optimizer_step(optimizer) -> int:
    """How many steps the Adam optimizer (ours, torch's, apex's, DeepSpeed-wrapped) has taken."""
    if hasattr(optimizer, "steps_taken"):  # megamoe.train.optimizer.AdamW
        return optimizer.steps_taken()
    inner = getattr(optimizer, "optimizer", optimizer)  # DeepSpeed wrappers hold the torch optimizer
    steps = [st["step"] for st in inner.state.values() if "step" in st]
    steps += [g["step"] for g in inner.param_groups if "step" in g]  # apex FusedAdam
    return int(max(float(s) for s in steps)) if steps else 0


def _param_state(p: torch.nn.Parameter, optimizer, with_moments: bool) -> list[torch.Tensor]:
    """[master weight, exp_avg, exp_avg_sq] of this rank's local `p`, where they live (not copied).

    Collective for DeepSpeed's ZeRO / bf16 optimizers (over p's data-parallel group).
    """
    if partitioned(p):  # DeepSpeed keeps fp32 master + moments in flat partitions
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
        found = [safe_get_full_fp32_param(p)]
        found += [safe_get_full_optimizer_state(p, k) for k in MOMENTS] if with_moments else []
    else:  # our AdamW (fp32 master beside a bf16 weight) or a torch optimizer (the weight itself)
        master = optimizer.master(p) if hasattr(optimizer, "master") else p
        found = [master] + ([optimizer.state[p][k] for k in MOMENTS] if with_moments and p.requires_grad else [])
    return [t.detach() for t in found]


class _HostCopies:
    """Copies of device tensors in host memory that training cannot change under the writer.

    CUDA tensors go to pinned buffers kept from one save to the next (allocated by the first
    save; the next save starts only once the previous one is written), copied asynchronously
    and waited for once: the training thread's whole stall. On the CPU, a plain clone, unless
    `in_place`: then host tensors are written from where they live and the caller waits for the
    write (the host-offloaded optimizer's state, 83 GB for OLMoE-1B-7B, is not doubled). Every
    tensor is also checked to be finite, on its device, with one read at the end."""

    _pinned: dict[str, torch.Tensor] = {}

    def __init__(self, in_place: bool = False):
        self.flags: list[torch.Tensor] = []
        self.cuda, self.in_place = False, in_place

    def __call__(self, key: str, t: torch.Tensor) -> torch.Tensor:
        self.flags.append(torch.isfinite(t).all())
        if not t.is_cuda:
            return t.contiguous() if self.in_place else t.clone().contiguous()
        self.cuda = True
        buf = self._pinned.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = self._pinned[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return buf.copy_(t, non_blocking=True)

    def finish(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        if self.flags and not bool(torch.stack([f.cpu() for f in self.flags]).all()):
            # the divergence guard should make this impossible
            raise CheckpointError("a parameter or its Adam state is not finite; no checkpoint is written over "
                                  "the last finite one (resume from it with a lower optim.lr)")


def save_checkpoint(writer: CheckpointWriter, step: int, model: torch.nn.Module, optimizer, state,
                    extra: dict) -> Path:
    """Collective: every rank copies its state to host memory here, in the calling thread (with
    every collective the copy needs, in the same order on each rank); `writer` writes its files
    and rank 0 publishes the directory, in `writer`'s background thread when it has one."""
    writer.wait()  # one save in flight at a time; raises if the previous one failed
    ckpt_root = writer.root
    final = ckpt_root / step_dir_name(step)
    tmp_name = [f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"]
    if dist.is_initialized():
        dist.broadcast_object_list(tmp_name, src=0)
    tmp = ckpt_root / tmp_name[0]
    tmp.mkdir(parents=True, exist_ok=True)
    r = state.rank

    opt_step = optimizer_step(optimizer)
    if opt_step:
        link_fragments(optimizer)
    weights, moments, cuts = {}, {}, {}
    # what training will change, copied before this returns (optim.offload: written in place)
    host = _HostCopies(in_place=getattr(optimizer, "host", None) is not None)
    for name, p in _named_params(model):
        master, *moms = _param_state(p, optimizer, with_moments=opt_step > 0)
        if _owns(p, state):
            weights[name], cuts[name] = host(name, master), shards(p)
            for key, t in zip(MOMENTS, moms):
                moments[f"{name}.{key}"], cuts[f"{name}.{key}"] = host(f"{name}.{key}", t), shards(p)
    host.finish()
    rng, rng_meta = _rng_state()

    def write_files() -> dict:
        digests = write_tensors(tmp / f"model-rank{r:05d}.safetensors", weights, cuts)
        if opt_step:
            digests |= write_tensors(tmp / f"optim-rank{r:05d}.safetensors", moments, cuts)
        digests |= write_tensors(tmp / f"rng-rank{r:05d}.safetensors", rng, rng_meta, "rng")
        return digests

    meta = meta_record(step, extra["config"], _layout(state, extra["config"]), state.world_size, {}, opt_step)
    writer.submit(step, tmp, write_files, meta)
    if host.in_place:
        writer.wait()  # training may change those host tensors only once they are written
    if not writer.background and dist.is_initialized():
        dist.barrier()  # returns once rank 0 published it
    return final


def _layout(state, config: dict) -> dict:
    return {"tp": state.tp, "pp": state.pp, "ep": state.ep, "dp": state.dp,
            "zero_stage": config.get("parallel", {}).get("zero_stage", 0)}


# Loading -------------------------------------------------------------------------------------

BIAS = ".router.expert_bias"  # aux-loss-free balancing's per-expert routing bias (a persistent buffer)


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, state, weights_only: bool = False) -> dict:
    """Restore this rank's parameters, optimizer state and RNG from a checkpoint of any layout;
    `weights_only`: the parameters (as the masters) with fresh optimizer state, and this run's RNG kept.

    Collective when the optimizer is DeepSpeed's (every rank must call it). Returns meta.
    """
    path = Path(path)
    meta = read_meta(path)
    params = dict(_named_params(model))
    opt_step = 0 if weights_only else (meta.get("optimizer") or {}).get("step", 0)
    with ShardedReader(path, meta, "model") as weights, ShardedReader(path, meta, "optim") as moments:
        if weights_only:  # routers' expert biases: kept when both runs balance with them, else as this run has
            have = set(weights.names())
            params = {n: p for n, p in params.items() if not n.endswith(BIAS) or n in have}
        _check_matches(path, weights, params, state, ignore=BIAS if weights_only else None)
        if opt_step and not hasattr(optimizer, "load_param_state"):
            _prepare_optimizer_state(optimizer, params.values(), opt_step)
        for name, p in params.items():
            box = piece_box(p.shape, shards(p))
            master = weights.read(name, box).to(p.device, torch.float32)
            found = ([moments.read(f"{name}.{k}", box).to(p.device, torch.float32) for k in MOMENTS]
                     if opt_step and p.requires_grad else [])
            if hasattr(optimizer, "load_param_state") and p.requires_grad:  # megamoe.train.optimizer.AdamW
                optimizer.load_param_state(p, master, found or _zero_moments(master), opt_step)
            else:
                _set_param_state(p, optimizer, master, found)
    if weights_only:
        return meta
    rng_file = path / f"rng-rank{state.rank:05d}.safetensors"
    if (rng_file.name in meta["files"] and meta["world_size"] == state.world_size
            and meta["layout"] == _layout(state, meta["config"])):
        verify_file(rng_file, meta)
        _set_rng_state(rng_file)
    else:  # another layout: ranks mean other things; reseed deterministically instead
        seed = meta["config"]["train"]["seed"]
        _reseed(zlib.crc32(f"{seed}:{meta['step']}:{state.rank}".encode()))
    return meta


def _check_matches(path: Path, weights: ShardedReader, params: dict, state, ignore: str | None = None) -> None:
    """One clear error when the checkpoint's tensors do not fit this model (`ignore`: extra tensors whose
    names end so are left unread)."""
    missing = sorted(set(params) - set(weights.names()))
    extra = sorted(n for n in set(weights.names()) - set(params) if not (ignore and n.endswith(ignore))
                   ) if state.pp == 1 else []
    if missing or extra:
        raise CheckpointError(f"{path} does not match this model's config: it lacks {missing[:4]} and has "
                              f"unexpected {extra[:4]} (check model.* / moe.* against its meta.json)")
    for name, p in params.items():
        if tuple(full_shape(p)) != weights.full_shapes[name]:
            raise CheckpointError(f"{path}: tensor {name} is {list(weights.full_shapes[name])} but "
                                  f"this model's config makes it {list(full_shape(p))}")


def _step_value(group: dict, like: torch.Tensor, step: int) -> torch.Tensor:
    """torch Adam's per-parameter step counter, on the device torch would put it."""
    device = like.device if group.get("fused") or group.get("capturable") else "cpu"
    return torch.tensor(float(step), dtype=torch.float32, device=device)


def _prepare_optimizer_state(optimizer, params, step: int) -> None:
    """Create (or reset the step of) the Adam state that the loaded moments are written into."""
    deepspeed = any(partitioned(p) for p in params)
    inner = optimizer.optimizer if deepspeed else optimizer
    for group in inner.param_groups:
        if "step" in group:  # apex FusedAdam counts steps per group
            group["step"] = step
        for hp in group["params"]:
            st = inner.state[hp]
            if "step" not in group:
                st["step"] = _step_value(group, hp, step)
            for k in MOMENTS:
                st.setdefault(k, torch.zeros_like(hp, memory_format=torch.preserve_format))
    if deepspeed:
        link_fragments(optimizer)


def _zero_moments(master: torch.Tensor) -> list[torch.Tensor]:
    return [torch.zeros_like(master) for _ in MOMENTS]


def _set_param_state(p: torch.nn.Parameter, optimizer, master: torch.Tensor, moments: list) -> None:
    with torch.no_grad():
        p.copy_(master)
    if partitioned(p):
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        safe_set_full_fp32_param(p, master)
        for k, t in zip(MOMENTS, moments):
            safe_set_full_optimizer_state(p, t, k)
    else:
        for k, t in zip(MOMENTS, moments):
            optimizer.state[p][k].copy_(t)


# RNG, as tensors plus a JSON line (no pickle) -----------------------------------------------

def _rng_state() -> tuple[dict, dict]:
    """Every RNG this process draws from: (tensors, plain numbers)."""
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np_keys.astype(np.int64)),
               "python": torch.tensor(py_state, dtype=torch.int64)}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return tensors, {"numpy": [int(np_pos), int(np_has_gauss), float(np_gauss)],
                     "python": [py_version, py_gauss]}


def _set_rng_state(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}
        numbers = json.loads(f.metadata()["rng"])
    torch.set_rng_state(t["torch"])
    pos, has_gauss, gauss = numbers["numpy"]
    np.random.set_state(("MT19937", t["numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, py_gauss = numbers["python"]
    random.setstate((version, tuple(t["python"].tolist()), py_gauss))
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])


def _reseed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
