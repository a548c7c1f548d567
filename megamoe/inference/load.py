"""The latest (or a given) checkpoint of a run as a plain 1-rank model, and its tokenizer."""

from pathlib import Path

from ..checkpoint.canonical import load_canonical
from ..checkpoint.files import CheckpointError
from ..config import Config, ConfigError, from_dict
from ..data.dataset import data_sources
from ..data.tokenizer import load_tokenizer
from ..model.olmoe import OLMoE


def load_model(path: Path, device: str = "cpu") -> tuple[OLMoE, Config]:
    """A 1-rank model holding the full weights of checkpoint `path` (run dir or step dir), and
    the config of its run (with the 1-rank layout)."""
    tensors, meta = load_canonical(path)
    try:
        cfg = from_dict(meta["config"])
    except ConfigError as e:
        raise CheckpointError(f"{path}: the config in its meta.json is not one this megamoe reads ({e}); "
                              "restore its meta.json or pick another checkpoint") from None
    cfg.parallel.tensor = cfg.parallel.pipeline = cfg.parallel.expert = 1
    model = cfg.model.build(cfg.moe)
    model.load_state_dict(tensors, strict=True)  # its input is one document (model.attention_mask alike)
    return model.to(device).eval(), cfg


def tokenizer_for(cfg):
    """The tokenizer of the run `cfg` describes (its datasets' or the embedded corpus's); CheckpointError
    naming it when it cannot be opened (moved since the run, or a relative data.tokenizer read elsewhere)."""
    try:
        return load_tokenizer(data_sources(cfg.data, cfg.model.vocab_size)[1])
    except (OSError, ValueError) as e:
        raise CheckpointError(f"the run's tokenizer (data.tokenizer={cfg.data.tokenizer}) cannot be opened: {e}; "
                              "put it back where the run had it, or run this from the directory the run was "
                              "launched in if that path is relative") from None
