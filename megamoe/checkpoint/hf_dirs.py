"""transformers OLMoE directories ↔ megamoe checkpoints, streamed tensor by tensor.

Export writes what `OlmoeForCausalLM.from_pretrained` reads: config.json, safetensors shards
with a `model.safetensors.index.json`, and the run's tokenizer. The default expert layout is
per expert (`mlp.experts.{j}.gate_proj.weight` ...), the published OLMoE layout: transformers
4.x loads it as is and transformers 5 converts it to its stacked layout on load
(`conversion_mapping.py`, olmoe → qwen2_moe). Import reads either layout.
"""

import dataclasses
import json
import re
import shutil
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..config import DataConfig, from_dict, read_config, with_overrides
from .canonical import expected_shapes, resolve, write_run
from .files import CheckpointError, ShardedReader, atomic_dir, read_meta, save_safetensors
from .hf import config_from_hf, from_hf, hf_config_dict, to_hf, to_hf_per_expert

INDEX = "model.safetensors.index.json"
MOE_FROM_HF = ("num_experts", "top_k", "ffn_hidden", "norm_topk_prob", "lb_loss_weight")  # set by config.json
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_hf(src: Path, out: Path, expert_layout: str = "per-expert", dtype: str | None = None,
              shard_bytes: int = 5 << 30, overwrite: bool = False, progress: bool = True,
              drop_expert_bias: bool = False) -> Path:
    """Checkpoint `src` (run or step dir, any layout) → transformers OLMoE directory `out`.
    `drop_expert_bias`: export a run with aux-loss-free expert biases without them."""
    step_dir = resolve(src)
    meta = read_meta(step_dir)
    cfg = from_dict(meta["config"])
    _check_exportable(cfg, drop_expert_bias)
    convert = {"per-expert": to_hf_per_expert, "stacked": to_hf}[expert_layout]
    with ShardedReader(step_dir, meta, "model") as reader, atomic_dir(out, overwrite) as tmp:
        expected = expected_shapes(cfg)
        missing = [n for n in expected if n not in reader.pieces]
        extra = [n for n in reader.names() if n not in expected]
        wrong = [n for n in expected if n in reader.pieces and tuple(reader.full_shapes[n]) != tuple(expected[n])]
        if missing or extra or wrong:
            raise CheckpointError(f"{step_dir}: its tensors do not match the model its meta.json describes (missing "
                                  f"{missing[:3]}, unexpected {extra[:3]}, other shapes {wrong[:3]}); restore "
                                  "its meta.json or pick another checkpoint")
        names = list(expected)
        names = [n for n in names if not n.endswith(".router.expert_bias")]
        out_dtype = DTYPES[dtype] if dtype else None
        shards = _plan(names, reader, out_dtype, shard_bytes)
        weight_map, total = {}, 0
        bar = tqdm(total=len(names), desc=f"exporting {step_dir.name}", unit="tensor", disable=not progress)
        for k, shard in enumerate(shards):
            file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for name in shard:
                t = reader.read(name)
                tensors.update(convert(name, t.to(out_dtype) if out_dtype else t))
                bar.update()
            save_safetensors(tensors, tmp / file, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            weight_map.update({key: file for key in tensors})
            del tensors
        bar.close()
        (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                             "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        written_dtype = out_dtype or _torch_dtype(reader.dtypes[names[0]])
        tokenizer = _export_tokenizer(cfg, tmp)
        _write_config(cfg, tmp, written_dtype, tokenizer)
    return Path(out)


def _check_exportable(cfg, drop_expert_bias: bool = False) -> None:
    moe = cfg.moe
    if moe.bias_update_rate and not drop_expert_bias:
        raise CheckpointError(f"this run routes with aux-loss-free expert biases (moe.bias_update_rate="
                              f"{moe.bias_update_rate}), which transformers' OLMoE has no place for: without "
                              "them it picks other experts. Pass --drop-expert-bias to export the weights anyway")
    if moe.num_experts == 0:
        raise CheckpointError("this checkpoint is dense (moe.num_experts=0); OLMoE has no dense form: "
                              "upcycle it first (megamoe-convert upcycle)")
    if moe.dense_layers:
        raise CheckpointError(f"this model has dense layers {moe.dense_layers} (moe.dense_layers); transformers' "
                              "OLMoE has a MoE in every layer and cannot express them")
    if moe.num_shared_experts or moe.routing != "token_choice" or moe.capacity_factor is not None:
        raise CheckpointError("transformers' OLMoE has dropless token-choice routing and no shared "
                              "experts; this run uses moe.routing / capacity_factor / num_shared_experts "
                              "it cannot express")


def _plan(names, reader, dtype, shard_bytes) -> list[list[str]]:
    """Group tensors, in model order, into shards of about `shard_bytes`."""
    shards, size = [[]], 0
    for name in names:
        itemsize = (dtype or _torch_dtype(reader.dtypes[name])).itemsize
        n = torch.Size(reader.full_shapes[name]).numel() * itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += n
    return shards


def _torch_dtype(safetensors_dtype: str) -> torch.dtype:
    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}[safetensors_dtype]


def _write_config(cfg, out: Path, dtype: torch.dtype, tokenizer) -> None:
    import transformers
    ids = {} if tokenizer is None else dict(eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id,
                                            pad_token_id=tokenizer.pad_id)
    config = transformers.OlmoeConfig(**hf_config_dict(cfg), architectures=["OlmoeForCausalLM"], **ids)
    config.save_pretrained(out)
    data = json.loads((out / "config.json").read_text())
    # transformers 4.x reads these keys (5 reads rope_parameters and dtype)
    data.update(rope_theta=cfg.model.rope_theta, torch_dtype=str(dtype).removeprefix("torch."))
    if tokenizer is None:
        data.update(eos_token_id=None, bos_token_id=None, pad_token_id=None)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True))


def _export_tokenizer(cfg, out: Path):
    """Copy the run's tokenizer (data.tokenizer, or the embedded corpus's) in transformers form."""
    from ..data.dataset import data_sources
    from ..data.tokenizer import HFTokenizer, load_tokenizer
    try:
        path = Path(data_sources(cfg.data, cfg.model.vocab_size)[1]).expanduser()
        tok = load_tokenizer(path)
    except Exception as e:  # noqa: BLE001 - the run's data may be elsewhere; the weights still export
        print(f"megamoe: warning: the run's tokenizer cannot be opened ({e}): the export gets the weights and "
              "config.json but no tokenizer files; export again where data.tokenizer is found, or save the "
              "tokenizer into it with transformers", file=sys.stderr, flush=True)
        return None
    if isinstance(tok, HFTokenizer):
        shutil.copy(path, out / "tokenizer.json")
        names = {k: tok.tok.id_to_token(i) for k, i in
                 [("eos_token", tok.eos_id), ("bos_token", tok.bos_id), ("pad_token", tok.pad_id)] if i is not None}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", **names}, indent=2))
        return tok
    # sentencepiece: tokenizer.model + a Llama-style config without the dummy prefix space
    # (megamoe's models are trained with none); transformers then writes tokenizer.json too.
    import transformers
    sp = tok.sp
    shutil.copy(path, out / "tokenizer.model")
    names = {k: sp.id_to_piece(i) for k, i in [("eos_token", sp.eos_id()), ("bos_token", sp.bos_id()),
                                                ("unk_token", sp.unk_id()), ("pad_token", sp.pad_id())] if i >= 0}
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
         "add_prefix_space": False, **names}, indent=2))
    transformers.AutoTokenizer.from_pretrained(out).save_pretrained(out)  # writes tokenizer.json
    # ...whose tokenizer_config.json only transformers 5 reads (extra_special_tokens as a list).
    # The fast tokenizer in tokenizer.json, named plainly, loads the same in 4.x and 5.x.
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", **names}, indent=2))
    return tok


# Import ------------------------------------------------------------------------------------

def import_hf(src: Path, run_dir: Path, overrides: list[str] = (), overwrite: bool = False,
              progress: bool = True, config: str | Path | None = None) -> Path:
    """transformers OLMoE directory `src` → new megamoe run `run_dir` (checkpoint at step 0).

    model.* and moe sizes come from config.json; the YAML `config` and then `overrides`
    (section.key=value) set the rest (data, optim, train, parallel). Streams one layer at a time.
    """
    src = Path(src)
    try:
        hf = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{src / 'config.json'} is missing: {src} is not a transformers model directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{src / 'config.json'} is not valid JSON ({e}); restore it") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{src / 'config.json'} is not a JSON object of settings; restore it")
    if hf.get("model_type") != "olmoe":
        raise CheckpointError(f"{src} holds a {hf.get('model_type')!r} model; only OLMoE ('olmoe') converts")
    try:
        model, moe = config_from_hf(hf)
        typed = from_dict({"model": dataclasses.asdict(model), "moe": dataclasses.asdict(moe)})  # types checked
        model, moe = typed.model, typed.moe
    except KeyError as e:
        raise CheckpointError(f"{src / 'config.json'} lacks {e.args[0]!r}, which an OLMoE config has; restore it") from None
    except (ValueError, TypeError) as e:  # a ConfigError is a ValueError: the megamoe key its value would set
        raise CheckpointError(f"{src / 'config.json'}: {e}") from None
    data = read_config(config)  # unless it or an override sets it, train on at most the model's positions
    data["data"] = {"seq_length": min(DataConfig.seq_length, model.max_seq_len), **(data.get("data") or {})}
    cfg = with_overrides(data, list(overrides))
    cfg.model = model
    for key in MOE_FROM_HF:
        setattr(cfg.moe, key, getattr(moe, key))
    files = _hf_files(src)
    groups: dict[str, list[str]] = {}
    for key in files:
        m = re.match(r"model\.layers\.(\d+)\.", key)
        groups.setdefault(f"layer {int(m.group(1)):05d}" if m else "top", []).append(key)
    tie = hf.get("tie_word_embeddings", False) and "lm_head.weight" not in files

    def tensors():
        handles = {}
        try:
            for group in tqdm(sorted(groups), desc=f"importing {src.name}", unit="layer", disable=not progress):
                state = {}
                for key in groups[group]:
                    f = files[key]
                    if f not in handles:
                        handles[f] = safe_open(str(src / f), framework="pt")
                    state[key] = handles[f].get_tensor(key)
                if tie and "model.embed_tokens.weight" in state:
                    state["lm_head.weight"] = state["model.embed_tokens.weight"]
                try:
                    converted = from_hf(state)
                except KeyError as e:
                    raise CheckpointError(f"{src}: {e.args[0]}") from None
                yield from sorted(converted.items())
        finally:
            handles.clear()

    return write_run(run_dir, cfg, tensors(), overwrite=overwrite)


def refuse_model_overrides(src: Path, overrides: list[str]) -> None:
    """from-hf's command line: an override of what config.json sets would be silently replaced."""
    keys = [o.partition("=")[0] for o in overrides]
    fixed = [k for k in keys if k.startswith("model.") or k in [f"moe.{m}" for m in MOE_FROM_HF]]
    if fixed:
        raise CheckpointError(f"{', '.join(fixed)}: from-hf takes the model (model.*, moe."
                              f"{'/'.join(MOE_FROM_HF)}) from {Path(src) / 'config.json'}, which "
                              "this override would not change; drop it")


def _hf_files(src: Path) -> dict[str, str]:
    """{tensor key: file} of a transformers directory (sharded with an index, or one file)."""
    index = src / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            assert isinstance(weight_map, dict)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index} is not a JSON object with a weight_map (tensor name → file); "
                                  "restore it") from None
    elif (src / "model.safetensors").is_file():
        weight_map = None
    else:
        raise CheckpointError(f"{src} has neither {INDEX} nor model.safetensors (only safetensors "
                              "checkpoints are read: .bin files would need unpickling)")
    for f in sorted(set(weight_map.values()) if weight_map else ["model.safetensors"]):
        if not isinstance(f, str) or Path(f).name != f:  # a bare name: nothing outside `src` is read
            raise CheckpointError(f"{INDEX} of {src} places tensors in {f!r}, which is not a file name "
                                  "inside that folder; fix its weight_map")
        if not (src / f).is_file():
            raise CheckpointError(f"shard {src / f} named by {INDEX} is missing")
        try:
            with safe_open(str(src / f), framework="pt") as sf:
                keys = list(sf.keys())
        except Exception as e:  # noqa: BLE001 - safetensors' own error type
            raise CheckpointError(f"shard {src / f} is corrupt or truncated ({e})") from None
        if weight_map is None:
            return {k: f for k in keys}
        absent = [k for k, v in weight_map.items() if v == f and k not in keys]
        if absent:
            raise CheckpointError(f"shard {src / f} lacks {absent[:3]} that {INDEX} places in it")
    return weight_map
