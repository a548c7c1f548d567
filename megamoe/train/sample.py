"""Load the latest (or a given) checkpoint of a run into one process and sample from it."""

from pathlib import Path

import torch

from ..checkpoint.canonical import load_canonical
from ..checkpoint.io import CheckpointError, latest_checkpoint
from ..config import from_dict
from ..data.dataset import data_sources
from ..data.tokenizer import load_tokenizer
from ..generate import generate
from ..model.olmoe import OLMoE


def load_model(path: Path, device: str = "cpu") -> tuple[OLMoE, dict]:
    """A 1-rank model holding the full weights of checkpoint `path` (run dir or step dir)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        found = latest_checkpoint(path / "checkpoints")
        if found is None:
            raise CheckpointError(f"{path} has no checkpoint yet (no checkpoints/latest)")
        path = found
    tensors, meta = load_canonical(path)
    cfg = from_dict(meta["config"])
    cfg.parallel.tensor = cfg.parallel.pipeline = cfg.parallel.expert = 1
    model = OLMoE(cfg)
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval(), meta


def tokenizer_for(cfg):
    return load_tokenizer(data_sources(cfg.data, cfg.model.vocab_size)[1])


@torch.no_grad()
def sample_from_checkpoint(path: Path, prompt: str, max_new_tokens: int, **kwargs) -> str:
    model, _ = load_model(path)
    return generate(model, tokenizer_for(model.cfg), prompt, max_new_tokens, **kwargs)
