"""Routing statistics: how evenly experts are used, and how they specialise by domain.

The embedded corpus has two domains (Python code and English docstrings); running each
through a trained model and counting the top-k assignments per expert shows what OLMoE's
paper measures: load balance per layer, and domain specialisation per expert (the share of an
expert's tokens that come from a domain, over that domain's share of all tokens: 1 = none).
Users' own domains come from tokenized datasets (one per prefix) or a JSONL field.
"""

import json
from pathlib import Path

import torch

from ..data.corpus import iter_stdlib_documents
from ..data.indexed import IndexedDataset


def _batches(stream: list[int], num_tokens: int, seq_len: int, name: str) -> list[torch.Tensor]:
    """[1, seq_len] batches of the first `num_tokens` tokens (whole sequences) of `stream`."""
    usable = min(len(stream), num_tokens) // seq_len * seq_len
    if usable == 0:
        raise ValueError(f"{name} has fewer tokens than one sequence ({seq_len}); give more data or --tokens")
    return list(torch.tensor(stream[:usable]).view(-1, 1, seq_len))


def domain_batches(tokenizer, domain: str, num_tokens: int, seq_len: int,
                   max_bytes: int | None = None) -> list[torch.Tensor]:
    """[1, seq_len] token batches of one embedded-corpus domain, `num_tokens` in all (at most)."""
    stream: list[int] = []
    for doc in iter_stdlib_documents(max_bytes):
        if doc["domain"] == domain:
            stream += tokenizer.encode(doc["text"]) + [tokenizer.eos_id]
            if len(stream) >= num_tokens:
                break
    return _batches(stream, num_tokens, seq_len, f"domain {domain!r}")


def indexed_batches(prefix: str | Path, num_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """Batches of a tokenized dataset (`PREFIX.bin/.idx`, made with the run's tokenizer)."""
    data = IndexedDataset(prefix)
    stream: list[int] = []
    for i in range(len(data)):
        stream += data[i].tolist()
        if len(stream) >= num_tokens:
            break
    return _batches(stream, num_tokens, seq_len, str(prefix))


def jsonl_domain_batches(path: str | Path, domain_field: str, text_field: str, tokenizer, num_tokens: int,
                         seq_len: int) -> dict[str, list[torch.Tensor]]:
    """{domain: batches} of a JSONL file whose records name their domain in `domain_field`."""
    streams: dict[str, list[int]] = {}
    if not Path(path).is_file():
        raise ValueError(f"--jsonl {path} does not exist; give a JSONL file of {{{text_field!r}: ..., "
                         f"{domain_field!r}: ...}} records")
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            missing = [f"{field!r} ({flag})" for field, flag in ((domain_field, "--domain-field"),
                                                                 (text_field, "--text-field")) if field not in record]
            if missing:
                raise ValueError(f"{path}:{n}: the record has no {' or '.join(missing)} field; name the fields "
                                 f"the records hold (it has {', '.join(map(repr, record)) or 'none'})")
            stream = streams.setdefault(str(record[domain_field]), [])
            if len(stream) < num_tokens:
                stream += tokenizer.encode(record[text_field]) + [tokenizer.eos_id]
    return {d: _batches(s, num_tokens, seq_len, f"{path} domain {d!r}") for d, s in sorted(streams.items())}


def report(counts: dict[str, torch.Tensor], layer_ids: list[int] | None = None) -> dict:
    """Per layer: load imbalance (max/mean share) and per-expert specialisation by domain.
    counts[domain]: [MoE layers, E]; layer_ids: their global indices (default 0, 1, ...)."""
    total = sum(counts.values())  # [L, E]
    domain_share = {d: float(c.sum() / total.sum()) for d, c in counts.items()}
    layers = []
    for i in range(total.shape[0]):
        share = total[i] / total[i].sum()
        expert_tokens = total[i].clamp_min(1e-12)
        layers.append({
            "layer": layer_ids[i] if layer_ids else i,
            "imbalance": float(share.max() * share.numel()),
            "share": share.tolist(),
            "specialisation": {d: ((c[i] / expert_tokens) / domain_share[d]).tolist()
                               for d, c in counts.items()},
        })
    return {"domain_share": domain_share, "layers": layers}


def format_report(rep: dict) -> str:
    """A table a person reads: one line per layer, the most specialised expert per domain."""
    lines = ["tokens by domain: " + ", ".join(f"{d} {s:.1%}" for d, s in rep["domain_share"].items()),
             "layer  imbalance(max/mean)  most specialised expert per domain (ratio to base rate)"]
    for layer in rep["layers"]:
        best = []
        for d, spec in layer["specialisation"].items():
            e = max(range(len(spec)), key=spec.__getitem__)
            best.append(f"{d}: expert {e} ×{spec[e]:.2f}")
        lines.append(f"{layer['layer']:>5}  {layer['imbalance']:>19.2f}  " + "; ".join(best))
    return "\n".join(lines)
