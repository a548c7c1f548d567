"""Sampling text from a model (no KV cache: meant for the small models of quick checks)."""

from pathlib import Path

import torch

from .load import load_model, tokenizer_for


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 48, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0) -> str:
    """Continue `prompt` by sampling `max_new_tokens` tokens; returns the continuation only."""
    model.eval()
    device = next(model.parameters()).device
    ids = tokenizer.encode(prompt)
    tokens = torch.tensor([ids], device=device)
    g = torch.Generator(device="cpu").manual_seed(seed)
    limit = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        # [tokenizer's vocab]: a model's vocab may be padded past it (OLMoE's 50,304 rows, a 32,000-piece
        # tokenizer); those rows are no tokens, and sampling one made decode fail
        logits = model(tokens[:, -limit:]).logits[0, -1, :tokenizer.vocab_size].float().cpu()
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            vals, idx = torch.topk(logits / temperature, min(top_k, logits.numel()))
            nxt = int(idx[torch.multinomial(torch.softmax(vals, -1), 1, generator=g)])
        if nxt == tokenizer.eos_id:
            break
        tokens = torch.cat([tokens, torch.tensor([[nxt]], device=device)], dim=1)
    return tokenizer.decode(tokens[0, len(ids):].tolist())


def sample_from_checkpoint(path: Path, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """The continuation of `prompt` by the latest (or a given) checkpoint of a run, on one process."""
    model, cfg = load_model(path)
    return generate(model, tokenizer_for(cfg), prompt, max_new_tokens, **kwargs)
