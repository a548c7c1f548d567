"""The latest (or a given) checkpoint of a run as a plain 1-rank model, and its tokenizer."""

from pathlib import Path

from ..checkpoint.canonical import load_canonical
from ..config import Config, from_dict
from ..data.dataset import data_sources
from ..data.tokenizer import load_tokenizer
from ..model.olmoe import OLMoE


def load_model(path: Path, device: str = "cpu") -> tuple[OLMoE, Config]:
    """A 1-rank model holding the full weights of checkpoint `path` (run dir or step dir), and
    the config of its run (with the 1-rank layout)."""
    tensors, meta = load_canonical(path)
    cfg = from_dict(meta["config"])
    cfg.parallel.tensor = cfg.parallel.pipeline = cfg.parallel.expert = 1
    model = cfg.model.build(cfg.moe)
    model.load_state_dict(tensors, strict=True)
    if cfg.model.attention_mask == "document":  # as the run trained: attention within each document
        model.document_eos = tokenizer_for(cfg).eos_id
    return model.to(device).eval(), cfg


def tokenizer_for(cfg):
    """The tokenizer of the run `cfg` describes (its datasets' or the embedded corpus's)."""
    return load_tokenizer(data_sources(cfg.data, cfg.model.vocab_size)[1])
