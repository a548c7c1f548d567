"""Typed run configuration: dataclasses loaded from YAML with dotted CLI overrides.

The config *describes* a run; the model, data and engine modules *build* from it. The
model's own sections, `ModelConfig` and `MoEConfig`, live with the model (`megamoe.model.config`:
`build()` and the parameter counts). Every validation error is raised from this file, as a `ConfigError` that names the key
and says how to fix it.
"""

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .model.config import ModelConfig, MoEConfig


class ConfigError(ValueError):
    """A config value is unknown, malformed or impossible; the message names key and fix."""


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    expert: int = 1
    sequence_parallel: bool = False
    zero_stage: int = 0  # 0, 1 or 2
    pipeline_layers: list[int] | None = None  # layers per stage; None = even split
    activation_checkpointing: str = "none"  # none | full | selective


@dataclass
class OptimConfig:
    lr: float = 4e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    decay_fraction: float = 0.2  # wsd: share of steps spent in the final decay
    offload: str = "none"  # none | cpu: fp32 masters and Adam moments in host memory, updated there


@dataclass
class DataConfig:
    paths: list[str] = field(default_factory=list)  # indexed-dataset prefixes; empty = embedded corpus
    weights: list[float] | None = None  # blending weights, one per path
    tokenizer: str | None = None  # sentencepiece .model or tokenizer.json; None = embedded corpus's
    seq_length: int = 4096
    valid_fraction: float = 0.02
    cache_dir: str = "~/.cache/megamoe"  # where the embedded corpus is built once


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 1234
    micro_batch_size: int = 1
    global_batch_size: int = 8
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda
    log_interval: int = 10
    eval_interval: int = 100
    eval_batches: int = 4
    eval_tasks: list[str] = field(default_factory=list)  # downstream tasks scored at each eval (docs/evaluation.md)
    eval_limit: int | None = None  # score only the first N items of each task
    save_interval: int = 500
    keep_checkpoints: int = 2  # 0 = keep all; never counts checkpoints newer than the resume point
    async_save: bool = True  # write checkpoints in a background thread (the copy to host stays in the step)
    collective_timeout_s: float = 600.0  # a collective (or a save) waiting longer fails the job
    compile: bool = False  # torch.compile each block (CUDA; ignored with a notice on CPU)
    max_skipped_steps: int = 10  # stop after this many steps in a row with a non-finite grad norm/loss
    gc_interval: int = 50  # Python's garbage collector off in the loop, run every N steps (0 = automatic)
    overlap_read: bool = True  # read a step's statistics once the next step is queued (same results)
    # FP8 experts (or attention projections) with several micro-batches a step: quantize their weights once a
    # step, not in every forward and backward (same results; two bytes a parameter of theirs of GPU memory kept)
    fp8_weight_cache: bool = True
    # the PyTorch profiler over steps [first, last] (a Chrome trace and a table of operators by device time,
    # in run.dir/profile/; megamoe.train.profile); null = off
    profile_steps: list[int] | None = None
    profile_ranks: list[int] = field(default_factory=lambda: [0])  # the ranks that profile them
    # a new run's weights from this megamoe checkpoint (run dir: its latest; or a step_* dir; any layout):
    # fresh optimizer state, step 0, this config's data and schedule (continued pretraining, annealing,
    # fine-tuning); ignored once run.dir has a checkpoint of its own, which a relaunch resumes
    init_from: str | None = None


@dataclass
class RunConfig:
    dir: str = "runs/default"
    tensorboard: bool = True
    sample_prompt: str | None = None  # printed with a generated continuation at the end
    sample_tokens: int = 48


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def olmoe_1b_7b(cls) -> "Config":
        """OLMoE-1B-7B (arXiv 2409.02060): 64 experts, 8 active, 6.9B total parameters."""
        return cls()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    # Derived sizes -------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor * self.parallel.pipeline)

    def moe_layer_ids(self) -> list[int]:
        """Global indices of the layers whose FFN is a MoE (`MoEConfig.layer_ids`)."""
        return self.moe.layer_ids(self.model.n_layers)

    def fp8_keys(self) -> list[str]:
        """The precision keys set to fp8 (FP8 experts, FP8 attention projections), in that order."""
        return [key for key, value in (("moe.expert_precision", self.moe.expert_precision),
                                       ("model.attention_precision", self.model.attention_precision)) if value == "fp8"]

    def grad_accumulation_steps(self, world_size: int) -> int:
        dp = self.data_parallel_size(world_size)
        return self.train.global_batch_size // (self.train.micro_batch_size * dp)

    def validate(self, world_size: int | None = None) -> "Config":
        """Check every value and every cross-key constraint; raise ConfigError on the first."""
        m, moe, p, o, d, t = self.model, self.moe, self.parallel, self.optim, self.data, self.train
        for key, value in [("model.vocab_size", m.vocab_size), ("model.d_model", m.d_model),
                           ("model.n_layers", m.n_layers), ("model.n_heads", m.n_heads),
                           ("moe.ffn_hidden", moe.ffn_hidden), ("parallel.tensor", p.tensor),
                           ("parallel.pipeline", p.pipeline), ("parallel.expert", p.expert),
                           ("data.seq_length", d.seq_length), ("train.steps", t.steps),
                           ("train.micro_batch_size", t.micro_batch_size),
                           ("train.global_batch_size", t.global_batch_size),
                           ("train.log_interval", t.log_interval),
                           ("train.eval_interval", t.eval_interval),
                           ("train.save_interval", t.save_interval),
                           ("train.max_skipped_steps", t.max_skipped_steps),
                           ("train.eval_batches", t.eval_batches), ("model.max_seq_len", m.max_seq_len),
                           ("run.sample_tokens", self.run.sample_tokens)]:
            _require(value >= 1, key, f"must be a positive integer, got {value}")
        _require(moe.num_experts >= 0, "moe.num_experts", "must be >= 0 (0 = dense FFN)")
        _require(moe.num_shared_experts >= 0, "moe.num_shared_experts", "must be >= 0 (0 = none)")
        _require(m.head_dim is None or m.head_dim >= 1, "model.head_dim",
                 f"must be a positive integer, or null for d_model // n_heads; got {m.head_dim}")
        for key, value in [("optim.lr", o.lr), ("model.rms_norm_eps", m.rms_norm_eps),
                           ("model.init_std", m.init_std), ("model.rope_theta", m.rope_theta),
                           ("optim.eps", o.eps), ("train.collective_timeout_s", t.collective_timeout_s)]:
            _require(math.isfinite(value) and value > 0, key, f"must be a finite number > 0, got {value}")
        for key, value in [("optim.grad_clip", o.grad_clip), ("optim.weight_decay", o.weight_decay),
                           ("moe.lb_loss_weight", moe.lb_loss_weight),
                           ("moe.z_loss_weight", moe.z_loss_weight)]:
            _require(math.isfinite(value) and value >= 0, key,
                     f"must be a finite number >= 0, got {value}" + (" (0 turns clipping off)"
                                                                     if key == "optim.grad_clip" else ""))
        for key, value in [("optim.beta1", o.beta1), ("optim.beta2", o.beta2)]:
            _require(0 <= value < 1, key, f"must be in [0, 1), got {value}")
        _require(m.clip_qkv is None or (math.isfinite(m.clip_qkv) and m.clip_qkv > 0), "model.clip_qkv",
                 f"must be a finite number > 0, or null for no clipping; got {m.clip_qkv}")
        if m.head_dim is None:
            _require(m.d_model % m.n_heads == 0, "model.n_heads",
                     f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}; "
                     "change one or set model.head_dim")
        _require(m.dim_per_head % 2 == 0, "model.head_dim", "RoPE needs an even head dimension")
        _require(d.seq_length <= m.max_seq_len, "data.seq_length",
                 f"{d.seq_length} exceeds model.max_seq_len={m.max_seq_len}; give data.seq_length="
                 f"{m.max_seq_len} or less (or a larger model.max_seq_len, if the model's positions allow)")
        _choice("moe.routing", moe.routing, ("token_choice", "expert_choice"))
        _choice("moe.backend", moe.backend, ("megamoe", "deepspeed"))
        _choice("moe.lb_loss_scope", moe.lb_loss_scope, ("micro_batch", "global_batch", "sequence"))
        _choice("moe.router_dtype", moe.router_dtype, ("model", "fp32"))
        _choice("model.attention_precision", m.attention_precision, ("model", "fp8"))
        _choice("model.attention_mask", m.attention_mask, ("causal", "document"))
        _require(m.attention_precision != "fp8" or (m.d_model % 16 == 0 and m.dim_per_head % 16 == 0),
                 "model.attention_precision", f"fp8 projections need d_model and the head dimension divisible by "
                 f"16 (got {m.d_model}, {m.dim_per_head}); change them or use model.attention_precision=model")
        _choice("moe.expert_precision", moe.expert_precision, ("model", "fp8"))
        if moe.expert_precision == "fp8":
            _require(moe.backend == "megamoe", "moe.expert_precision",
                     "fp8 expert GEMMs are megamoe's own; set moe.backend=megamoe")
            _require(m.d_model % 16 == 0 and moe.ffn_hidden % 16 == 0, "moe.expert_precision",
                     f"fp8 GEMMs need d_model and moe.ffn_hidden divisible by 16 "
                     f"(got {m.d_model}, {moe.ffn_hidden}); change them or use moe.expert_precision=model")
        if moe.backend == "deepspeed":
            _require(moe.routing == "token_choice", "moe.routing",
                     "expert choice is not available with moe.backend=deepspeed; use moe.backend=megamoe")
            _require(moe.num_shared_experts == 0, "moe.num_shared_experts",
                     "shared experts are not available with moe.backend=deepspeed; use moe.backend=megamoe")
            _require(moe.lb_loss_scope == "micro_batch", "moe.lb_loss_scope",
                     "DeepSpeed-MoE's gate balances each micro-batch only; use moe.backend=megamoe")
            _require(moe.bias_update_rate == 0, "moe.bias_update_rate",
                     "DeepSpeed-MoE's gate has no expert bias; use moe.backend=megamoe")
        if moe.num_experts:
            _require(1 <= moe.top_k <= moe.num_experts, "moe.top_k",
                     f"must be in [1, num_experts={moe.num_experts}], got {moe.top_k}")
        _require(moe.capacity_factor is None or moe.capacity_factor > 0, "moe.capacity_factor",
                 "must be positive, or null for dropless routing")
        _require(moe.lb_loss_weight >= 0 and moe.z_loss_weight >= 0, "moe.lb_loss_weight",
                 "auxiliary loss weights must be >= 0")
        if moe.dense_layers:
            _require(moe.num_experts > 0, "moe.dense_layers",
                     "every layer of a dense model (moe.num_experts=0) is dense already; remove it")
            _require(len(set(moe.dense_layers)) == len(moe.dense_layers)
                     and all(0 <= i < m.n_layers for i in moe.dense_layers), "moe.dense_layers",
                     f"needs distinct layer indices in [0, n_layers={m.n_layers}), got {moe.dense_layers}")
            _require(len(moe.dense_layers) < m.n_layers, "moe.dense_layers",
                     "names every layer: keep one MoE layer, or set moe.num_experts=0 for a dense model")
        _require(moe.dense_ffn_hidden is None or moe.dense_ffn_hidden >= 1, "moe.dense_ffn_hidden",
                 "must be a positive integer, or null for (top_k + num_shared_experts) × ffn_hidden")
        _require(moe.bias_update_rate >= 0, "moe.bias_update_rate", "must be >= 0 (0 = off; DeepSeek-V3 used 1e-3)")
        _require(moe.bias_update_rate == 0 or moe.routing == "token_choice", "moe.bias_update_rate",
                 "the expert bias steers token choice; expert choice is balanced by construction: set it to 0")
        _choice("optim.schedule", o.schedule, ("cosine", "wsd", "constant"))
        _require(o.lr > 0, "optim.lr", "must be positive")
        _require(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
        _require(0 < o.decay_fraction <= 1, "optim.decay_fraction", "must be in (0, 1]")
        _require(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(0 < d.valid_fraction < 1, "data.valid_fraction", "must be in (0, 1)")
        if d.weights is not None:
            _require(len(d.weights) == len(d.paths), "data.weights",
                     f"has {len(d.weights)} entries but data.paths has {len(d.paths)}; "
                     "give one weight per path")
            _require(all(w > 0 for w in d.weights), "data.weights", "weights must be positive")
        _require(not d.paths or d.tokenizer, "data.tokenizer",
                 "data.paths is set, so name the tokenizer those datasets were built with")
        _require(d.paths or not d.tokenizer, "data.tokenizer",
                 "data.paths is empty, so the embedded corpus is used, with its own tokenizer; "
                 "unset data.tokenizer, or set data.paths to datasets built with it")
        _require(t.gc_interval >= 0, "train.gc_interval",
                 f"must be an integer >= 0 (steps between garbage collections; 0 = Python's automatic "
                 f"collector), got {t.gc_interval!r}")
        _require(t.keep_checkpoints >= 0, "train.keep_checkpoints",
                 f"must be >= 0 (0 keeps every checkpoint), got {t.keep_checkpoints}")
        _choice("train.precision", t.precision, ("auto", "fp32", "bf16"))
        if t.profile_steps is not None:
            steps = t.profile_steps
            _require(len(steps) == 2 and 1 <= steps[0] <= steps[1] <= t.steps, "train.profile_steps",
                     f"needs [first, last] with 1 <= first <= last <= train.steps={t.steps} (e.g. [10, 12]), or "
                     f"null for no profile; got {steps}")
        _require(len(t.profile_ranks) >= 1 and all(r >= 0 for r in t.profile_ranks), "train.profile_ranks",
                 f"needs one or more rank numbers >= 0 (e.g. [0]); got {t.profile_ranks}")
        from .eval.tasks import TaskError, check_spec
        for spec in t.eval_tasks:
            try:
                check_spec(spec)
            except TaskError as e:
                raise ConfigError(f"train.eval_tasks: {e}") from None
        _require(t.eval_limit is None or t.eval_limit >= 1, "train.eval_limit",
                 f"must be a positive number of items, or null for all; got {t.eval_limit}")
        _choice("train.device", t.device, ("auto", "cpu", "cuda"))
        _choice("parallel.activation_checkpointing", p.activation_checkpointing,
                ("none", "full", "selective"))
        _choice("parallel.zero_stage", p.zero_stage, (0, 1, 2))
        _choice("optim.offload", o.offload, ("none", "cpu"))
        _require(o.offload == "none" or p.zero_stage == 0, "optim.offload",
                 f"the host-memory optimizer is megamoe's own, used with parallel.zero_stage=0; "
                 f"set parallel.zero_stage=0 (got {p.zero_stage}) or optim.offload=none")
        # Layout vs model (checked before any process group exists).
        _require(m.n_heads % p.tensor == 0, "parallel.tensor",
                 f"n_heads={m.n_heads} is not divisible by tensor={p.tensor}")
        _require(m.vocab_size % p.tensor == 0, "parallel.tensor",
                 f"vocab_size={m.vocab_size} is not divisible by tensor={p.tensor}; pad the vocab")
        _require(not p.sequence_parallel or p.tensor > 1, "parallel.sequence_parallel",
                 "sequence parallelism splits activations over tensor-parallel ranks; "
                 "set parallel.tensor > 1 or sequence_parallel=false")
        if p.sequence_parallel:
            _require(d.seq_length % p.tensor == 0, "data.seq_length",
                     f"sequence parallel needs seq_length divisible by tensor={p.tensor}")
        _require(p.pipeline <= m.n_layers, "parallel.pipeline",
                 f"pipeline={p.pipeline} is deeper than n_layers={m.n_layers}")
        if p.pipeline_layers is not None:
            _require(len(p.pipeline_layers) == p.pipeline and sum(p.pipeline_layers) == m.n_layers
                     and min(p.pipeline_layers) >= 1, "parallel.pipeline_layers",
                     f"needs {p.pipeline} positive entries summing to n_layers={m.n_layers}, "
                     f"got {p.pipeline_layers}")
        else:
            _require(m.n_layers % p.pipeline == 0, "parallel.pipeline",
                     f"n_layers={m.n_layers} is not divisible by pipeline={p.pipeline}; "
                     "change it or give parallel.pipeline_layers")
        if p.expert > 1:
            _require(moe.num_experts > 0, "parallel.expert", "expert parallelism needs experts")
            _require(p.expert <= moe.num_experts, "parallel.expert",
                     f"expert={p.expert} is larger than num_experts={moe.num_experts}")
            _require(moe.num_experts % p.expert == 0, "parallel.expert",
                     f"num_experts={moe.num_experts} is not divisible by expert={p.expert}")
        if world_size is not None:
            mp = p.tensor * p.pipeline
            _require(world_size % mp == 0, "parallel",
                     f"world size {world_size} is not divisible by tensor×pipeline={mp}")
            dp = world_size // mp
            _require(dp % p.expert == 0, "parallel.expert",
                     f"expert={p.expert} must divide the data-parallel size {dp} "
                     f"(world {world_size} / tensor {p.tensor} / pipeline {p.pipeline})")
            _require(max(t.profile_ranks) < world_size, "train.profile_ranks",
                     f"names rank {max(t.profile_ranks)} of a world of {world_size} (ranks 0-{world_size - 1})")
            per_step = t.micro_batch_size * dp
            _require(t.global_batch_size % per_step == 0, "train.global_batch_size",
                     f"{t.global_batch_size} is not a multiple of micro_batch_size × data-parallel "
                     f"size = {t.micro_batch_size} × {dp} = {per_step}")
        return self


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _choice(key: str, value, choices: tuple) -> None:
    _require(value in choices, key, f"must be one of {', '.join(map(str, choices))}; got {value!r}")


# Loading ---------------------------------------------------------------------------------

PRESETS = Path(__file__).parent / "configs"  # the repository's configs/, shipped in the package


def presets() -> list[str]:
    """Names of the shipped configs, which `--config` takes from any directory."""
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """YAML file or preset name (optional) + `section.key=value` overrides → validated-shape Config."""
    return with_overrides(read_config(path), overrides)


def read_config(path: str | Path | None) -> dict:
    """The sections of a YAML config file or preset ({} for none), not yet checked."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file() and str(path) in presets():
            path = PRESETS / f"{path}.yaml"
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file "
                              f"or a preset name: {', '.join(presets())}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "save it as UTF-8") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if data is None:
            raise ConfigError(f"config file {path} is empty; give it the sections to set (see "
                              "configs/), or leave out --config for the OLMoE-1B-7B defaults")
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    return data


def with_overrides(data: dict, overrides: list[str] = ()) -> Config:
    """A Config from nested dicts (a YAML file's, a checkpoint's) with `section.key=value`
    overrides applied; `data` itself is left unchanged."""
    for section, values in (data or {}).items():
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping of keys (section.key: value), got {values!r}")
    data = {k: dict(v or {}) for k, v in data.items()} if data else {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {item!r} must look like section.key=value, "
                              "e.g. train.steps=100")
        section, _, name = key.partition(".")
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as e:
            problem = str(getattr(e, "problem", None) or e).strip()
            raise ConfigError(f"{key}: {raw!r} is not a YAML value ({problem}); quote it as a string, e.g. "
                              f"'{key}=\"...\"', or write a list as [a, b]") from None
        data.setdefault(section, {})[name] = value
    return from_dict(data)


def from_dict(data: dict) -> Config:
    """Build a Config from nested dicts, checking every key and coercing every type."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    kwargs = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(_unknown(section, sections))
        if not isinstance(values, dict):
            raise ConfigError(f"{section}: must be a mapping of keys, got {values!r}")
        cls = hints[section]
        field_types = typing.get_type_hints(cls)
        fields = {}
        for name, value in values.items():
            key = f"{section}.{name}"
            if name not in field_types:
                raise ConfigError(_unknown(key, [f"{section}.{n}" for n in field_types]))
            fields[name] = _coerce(key, value, field_types[name])
        kwargs[section] = cls(**fields)
    return Config(**kwargs)


def _unknown(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    hint = f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"
    return f"{key}: unknown key{hint}"


def _coerce(key: str, value, tp):
    """Check `value` against the annotation `tp` (int, float, bool, str, X | None, list[X])."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r} (write [a, b])")
        return [_coerce(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # YAML 1.1 reads "1e-2" (no dot) as a string
            return float(value) if isinstance(value, str) else None
        except ValueError:
            pass
    elif tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"{key}: expected {getattr(tp, '__name__', tp)}, got {value!r}")
