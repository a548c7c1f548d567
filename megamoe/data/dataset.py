"""Training samples: documents packed into fixed-length sequences, blended across datasets.

Every sample is a pure function of (dataset files, seed, split, sample index), and the batch
of a step is a pure function of the step, so a resumed run reads exactly the samples it
would have read had it never stopped.
"""

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch

from megamoe.config import ConfigError, DataConfig
from megamoe.data import prepare
from megamoe.data.indexed import IndexedDataset, dataset_exists, loss_mask_prefix
from megamoe.data.tokenizer import Tokenizer, load_tokenizer

SPLIT_SEED = 0x5EED  # fixed: the train/valid split must not move when the training seed does


def split_documents(num_docs: int, valid_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic document split → (train ids, valid ids), both sorted and disjoint.

    Valid documents are a fixed pseudo-random subset (not the tail), so they are drawn from
    the whole corpus, both domains included.
    """
    n_valid = max(1, round(num_docs * valid_fraction))
    if num_docs - n_valid < 1:
        raise ConfigError(f"data.paths: cannot split {num_docs} document(s) into train and valid; "
                         "give a dataset with more documents")
    order = np.random.default_rng(SPLIT_SEED).permutation(num_docs)
    return np.sort(order[n_valid:]), np.sort(order[:n_valid])


class GPTDataset:
    """Documents packed end to end into samples of `seq_length + 1` tokens, Megatron style.

    The token stream is epoch 0's documents in a shuffled order, then epoch 1's in another,
    and so on (each epoch's order from its own seeded RNG). Sample k of the stream is tokens
    [k * seq_length, (k + 1) * seq_length] (one token of overlap: inputs and shifted targets);
    samples may cross document boundaries, where the EOS stored at each document's end
    separates them. Epoch e owns the stream samples that start inside it, and these are
    visited in a shuffled order before any sample of epoch e + 1, so within an epoch every
    token is a target exactly once. Sample i never depends on `num_samples`, so lengthening
    a run keeps its past.

    doc_idx     [epochs + 1 * docs]  document visited at each stream position
    cum_tokens  [same]               tokens in the stream up to and including that position
    shuffle_idx [num_samples]        stream sample read for sample i
    """

    def __init__(self, indexed: IndexedDataset, documents: np.ndarray, seq_length: int,
                 num_samples: int, seed: int, loss_mask: IndexedDataset | None = None):
        self.indexed, self.seq_length, self.num_samples = indexed, seq_length, num_samples
        self.mask = loss_mask  # per-token 0/1 (fine-tuning data), read with the same spans
        documents = np.asarray(documents, dtype=np.int64)
        tokens_per_epoch = int(indexed.sizes[documents].sum(dtype=np.int64))
        if tokens_per_epoch <= seq_length:
            raise ConfigError(f"data.paths: {indexed.prefix}: the split holds {tokens_per_epoch} tokens, "
                              f"not enough for one sample of seq_length={seq_length}; use more data or "
                              "a shorter data.seq_length")
        # Epoch e's samples are the k with e*T <= k*L < (e+1)*T (T tokens/epoch, L seq_length):
        # k from ceil(e*T/L). The fewest epochs holding num_samples: ceil(epochs*T/L) >= N.
        epochs = (num_samples - 1) * seq_length // tokens_per_epoch + 1
        first_sample = [-(-e * tokens_per_epoch // seq_length) for e in range(epochs + 1)]
        # One extra epoch of documents: the last sample of an epoch runs into the next.
        self.doc_idx = np.concatenate(
            [np.random.default_rng([seed, e]).permutation(documents) for e in range(epochs + 1)])
        self.cum_tokens = np.cumsum(indexed.sizes[self.doc_idx], dtype=np.int64)
        self.shuffle_idx = np.concatenate(
            [first_sample[e] + np.random.default_rng([seed, e, 1]).permutation(
                first_sample[e + 1] - first_sample[e]) for e in range(epochs)])[:num_samples]
        self.epochs = epochs

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        """Sample i → int64 tokens [seq_length + 1]."""
        return self._read(self.indexed, i).astype(np.int64)

    def loss_mask(self, i: int) -> np.ndarray:
        """Sample i's loss mask → bool [seq_length + 1]: all True for data without one."""
        if self.mask is None:
            return np.ones(self.seq_length + 1, dtype=bool)
        return self._read(self.mask, i).astype(bool)

    def documents(self, i: int) -> np.ndarray:
        """Sample i's document numbers → int64 [seq_length + 1]: 0 for the tokens of the first document
        it holds (or the part of one), 1 for the next, ... (`model.attention_mask=document`). The index's
        documents, not its EOS tokens: a chat conversation, EOS-ended turns and all, is one document.
        From the index's sizes alone: no token is read."""
        return np.concatenate([np.full(take, k, dtype=np.int64) for k, (_, _, take) in enumerate(self._spans(i))])

    def _read(self, source: IndexedDataset, i: int) -> np.ndarray:
        return np.concatenate([source.get(doc, offset, take) for doc, offset, take in self._spans(i)])

    def _spans(self, i: int) -> list[tuple[int, int, int]]:
        """Sample i as the (document, offset, length) spans of consecutive documents that make it up."""
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        start = int(self.shuffle_idx[i]) * self.seq_length
        pos = int(np.searchsorted(self.cum_tokens, start, side="right"))
        offset = start - (int(self.cum_tokens[pos - 1]) if pos else 0)
        need, spans = self.seq_length + 1, []
        while need:
            doc = int(self.doc_idx[pos])
            take = min(need, int(self.indexed.sizes[doc]) - offset)
            spans.append((doc, offset, take))
            need, pos, offset = need - take, pos + 1, 0
        return spans


def blend_indices(weights: list[float], num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """Megatron's greedy blending → (dataset of sample i, index of i within that dataset).

    Each sample goes to the dataset furthest behind its target share, so after any prefix of
    n samples dataset j holds weight_j * n of them to within one sample.
    """
    w = np.asarray(weights, dtype=np.float64) / sum(weights)
    counts = np.zeros(len(w), dtype=np.int64)
    dataset_idx = np.empty(num_samples, dtype=np.int16)
    sample_idx = np.empty(num_samples, dtype=np.int64)
    for i in range(num_samples):
        j = int(np.argmax(w * (i + 1) - counts))
        dataset_idx[i], sample_idx[i] = j, counts[j]
        counts[j] += 1
    return dataset_idx, sample_idx


def samples_per_dataset(weights: list[float], num_samples: int) -> list[int]:
    """How many samples each blended dataset must provide (greedy blending's upper bound)."""
    total = sum(weights)
    return [math.ceil(w / total * num_samples) + 1 for w in weights]


class BlendedDataset:
    """Samples drawn from several datasets in the proportions of `weights`, deterministically."""

    def __init__(self, datasets: list, weights: list[float], num_samples: int):
        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"need one weight per dataset, got {len(weights)} weights for "
                             f"{len(datasets)} datasets")
        self.datasets, self.num_samples = datasets, num_samples
        self.dataset_idx, self.sample_idx = blend_indices(weights, num_samples)
        for j, dataset in enumerate(datasets):
            used = int((self.dataset_idx == j).sum())
            assert used <= len(dataset), f"dataset {j} has {len(dataset)} samples, needs {used}"

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[self.dataset_idx[i]][int(self.sample_idx[i])]

    @property
    def has_loss_mask(self) -> bool:
        """Whether any part is fine-tuning data (then the trainer masks labels and normalises
        the loss by the step's target count)."""
        return any(getattr(d, "mask", None) is not None for d in self.datasets)

    def loss_mask(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[self.dataset_idx[i]].loss_mask(int(self.sample_idx[i]))

    def documents(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.num_samples} samples")
        return self.datasets[self.dataset_idx[i]].documents(int(self.sample_idx[i]))


def data_sources(data_cfg: DataConfig, model_vocab_size: int | None = None) -> tuple[list[str], str]:
    """(dataset prefixes, tokenizer path) of a run; builds the embedded corpus if it has no paths.

    The embedded corpus is built once into `data.cache_dir` with a vocabulary of
    min(4096, model_vocab_size), and always comes with its own tokenizer.
    """
    if data_cfg.paths:
        return list(data_cfg.paths), str(data_cfg.tokenizer)
    if data_cfg.tokenizer:
        raise ValueError(f"data.tokenizer={data_cfg.tokenizer} but data.paths is empty: the "
                         "embedded corpus is tokenized with its own tokenizer; unset "
                         "data.tokenizer, or set data.paths to datasets built with it")
    vocab = min(prepare.DEFAULT_VOCAB_SIZE, model_vocab_size or prepare.DEFAULT_VOCAB_SIZE)
    prefix, tokenizer_path = prepare.ensure_default_corpus(
        Path(data_cfg.cache_dir).expanduser(), vocab_size=vocab)
    return [str(prefix)], str(tokenizer_path)


def check_data(data_cfg: DataConfig, model_vocab_size: int) -> None:
    """Every problem of `data.paths` / `data.tokenizer` as one ConfigError, before any setup:
    a missing or unreadable tokenizer or dataset, a truncated or corrupt .bin/.idx, a tokenizer
    or a token id that does not fit model.vocab_size (under tensor parallelism such ids would
    otherwise train silently on zero embeddings). The embedded corpus is built to fit."""
    if not data_cfg.paths:
        return
    try:
        tokenizer = load_tokenizer(data_cfg.tokenizer)
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer: {e}") from None
    if tokenizer.vocab_size > model_vocab_size:
        raise ConfigError(f"model.vocab_size: data.tokenizer {data_cfg.tokenizer} has {tokenizer.vocab_size} "
                          f"tokens, more than model.vocab_size={model_vocab_size}; raise model.vocab_size "
                          "(a multiple of parallel.tensor) or name the tokenizer the data was built with")
    for prefix in data_cfg.paths:
        try:
            indexed = IndexedDataset(prefix)
            _loss_mask_for(prefix, indexed)
            largest = max_token_id(indexed, Path(data_cfg.cache_dir).expanduser())
        except ConfigError:
            raise
        except (OSError, ValueError) as e:
            raise ConfigError(f"data.paths: {e}") from None
        if largest >= model_vocab_size:
            raise ConfigError(f"data.paths: {prefix}.bin holds token id {largest}, which model.vocab_size="
                              f"{model_vocab_size} has no embedding for: the data was built with a larger "
                              "tokenizer. Rebuild it with data.tokenizer (megamoe-preprocess), or "
                              f"raise model.vocab_size above {largest}")


def max_token_id(indexed: IndexedDataset, cache_dir: Path) -> int:
    """The largest token id in a dataset: read once, then remembered in `cache_dir` for as long
    as the .bin keeps its size and modification time (a pretraining corpus is large)."""
    bin_path = Path(f"{indexed.prefix}.bin").resolve()
    st = bin_path.stat()
    key = hashlib.sha1(f"{bin_path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()
    cached = cache_dir / "max-token-id" / key
    try:
        return int(cached.read_text())
    except (OSError, ValueError):
        pass
    largest = indexed.max_token()
    try:  # a cache, not a requirement: written atomically, skipped where it cannot be
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f"{key}.tmp{os.getpid()}")
        tmp.write_text(str(largest))
        os.replace(tmp, cached)
    except OSError:
        pass
    return largest


def build_datasets(data_cfg: DataConfig, seed: int, num_train_samples: int,
                   num_valid_samples: int, model_vocab_size: int | None = None
                   ) -> tuple[BlendedDataset, BlendedDataset, Tokenizer]:
    """(train, valid, tokenizer) for a run, from `data.paths` or the embedded corpus.

    Each dataset is split into train/valid documents by `data.valid_fraction`; the splits
    are blended by `data.weights` (default equal).
    """
    prefixes, tokenizer_path = data_sources(data_cfg, model_vocab_size)
    tokenizer = load_tokenizer(tokenizer_path)
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise ValueError(f"data.tokenizer {tokenizer_path} has {tokenizer.vocab_size} tokens, more "
                         f"than model.vocab_size={model_vocab_size}; raise model.vocab_size")
    weights = data_cfg.weights or [1.0] * len(prefixes)
    indexed = [IndexedDataset(p) for p in prefixes]
    masks = [_loss_mask_for(p, ds) for p, ds in zip(prefixes, indexed)]
    splits = [split_documents(len(ds), data_cfg.valid_fraction) for ds in indexed]
    blended = []
    for which, num_samples in ((0, num_train_samples), (1, num_valid_samples)):
        parts = [GPTDataset(ds, split[which], data_cfg.seq_length, n, seed, mask)
                 for ds, mask, split, n in zip(indexed, masks, splits,
                                               samples_per_dataset(weights, num_samples))]
        blended.append(BlendedDataset(parts, weights, num_samples))
    return blended[0], blended[1], tokenizer


def _loss_mask_for(prefix: str, tokens: IndexedDataset) -> IndexedDataset | None:
    """PREFIX.lossmask.bin/.idx when it exists; it must describe the same documents."""
    if not dataset_exists(loss_mask_prefix(prefix)):
        return None
    mask = IndexedDataset(loss_mask_prefix(prefix))
    if not np.array_equal(mask.sizes, tokens.sizes):
        raise ConfigError(f"data.paths: {loss_mask_prefix(prefix)}.idx does not describe the documents "
                          f"of {prefix}.idx ({len(mask)} vs {len(tokens)} documents, or other lengths): "
                          "the two were not written together; run megamoe-preprocess again "
                          "with --overwrite")
    return mask


def get_batch(dataset, step: int, global_batch_size: int, micro_batch_size: int,
              dp_rank: int, dp_size: int, micro_step: int, loss_mask: bool = False,
              documents: bool = False) -> torch.Tensor:
    """The micro-batch of one DP rank at one micro-step of `step` → LongTensor [mbs, seq+1].

    Step s reads samples [s * gbs, (s + 1) * gbs). Within it, sample
        s * gbs + micro_step * (mbs * dp_size) + dp_rank * mbs + j,   j < mbs
    goes to rank `dp_rank` at `micro_step`: each micro-step takes the next mbs * dp_size
    samples, rank-major. So DP2 × accumulation 1 and DP1 × accumulation 2 read the same
    samples per step, in the same order. `loss_mask=True` returns those samples' loss masks
    (bool) instead of their tokens, `documents=True` their document numbers (`GPTDataset.documents`).
    """
    per_micro_step = micro_batch_size * dp_size
    if global_batch_size % per_micro_step:
        raise ValueError(f"global_batch_size={global_batch_size} is not a multiple of "
                         f"micro_batch_size × dp_size = {per_micro_step}")
    assert 0 <= dp_rank < dp_size and 0 <= micro_step < global_batch_size // per_micro_step
    first = step * global_batch_size + micro_step * per_micro_step + dp_rank * micro_batch_size
    if first + micro_batch_size > len(dataset):
        raise IndexError(f"step {step} needs sample {first + micro_batch_size - 1} but the dataset "
                         f"holds {len(dataset)}; build it with more samples (steps × global batch)")
    read = dataset.loss_mask if loss_mask else dataset.documents if documents else dataset.__getitem__
    return torch.from_numpy(np.stack([read(first + j) for j in range(micro_batch_size)]))
