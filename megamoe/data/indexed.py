"""Megatron-style memory-mapped indexed dataset: documents in `prefix.bin`, index in `prefix.idx`.

The layout is byte-compatible with Megatron-LM's MMapIndexedDataset (version 1), so datasets
made by its `preprocess_data.py` load here and ours load there:

  prefix.bin  every document's tokens, concatenated, little-endian `dtype`
  prefix.idx  magic b"MMIDIDX\\x00\\x00" | version <u64 = 1> | dtype code <u8>
              | n sequences <u64> | n document indices <u64 = n + 1>
              | sizes int32[n] (tokens per document) | pointers int64[n] (byte offset in .bin)
              | document indices int64[n + 1] (0..n: one sequence per document here)

The builder writes both files under temporary names and renames them at the end, .idx last,
so a reader that finds `prefix.idx` always finds a complete `prefix.bin` beside it.
"""

import os
import struct
from pathlib import Path

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# Megatron's dtype codes.
DTYPE_CODES = {np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3,
               np.dtype(np.int32): 4, np.dtype(np.int64): 5, np.dtype(np.float64): 6,
               np.dtype(np.float32): 7, np.dtype(np.uint16): 8}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, n sequences, n doc indices


# Fine-tuning data: PREFIX.lossmask.bin/.idx beside PREFIX.bin/.idx, one uint8 per token
# (1 = a target the loss counts, 0 = context only, e.g. a prompt), same document sizes.
LOSS_MASK_SUFFIX = ".lossmask"


def loss_mask_prefix(prefix: str | Path) -> str:
    return f"{prefix}{LOSS_MASK_SUFFIX}"


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair is missing, truncated or corrupt; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds every id of a vocabulary this size."""
    return np.dtype(np.uint16 if vocab_size <= 65535 else np.int32)


def dataset_exists(prefix: str | Path) -> bool:
    return Path(f"{prefix}.idx").exists() or Path(f"{prefix}.bin").exists()


class IndexedDatasetBuilder:
    """Append token documents one by one, then `finalize()` to publish prefix.bin + prefix.idx.

    Use as a context manager: leaving the block by an exception removes the partial files.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16):
        self.prefix = str(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"token dtype {self.dtype} is not storable; use uint16 or int32")
        self._limit = np.iinfo(self.dtype).max
        self._tmp = f".tmp{os.getpid()}"
        Path(self.prefix).parent.mkdir(parents=True, exist_ok=True)
        self._bin = open(f"{self.prefix}.bin{self._tmp}", "wb")
        self._sizes: list[int] = []

    def add_document(self, ids) -> None:
        """Append one document (a sequence of token ids)."""
        array = np.asarray(ids)
        if array.size and (array.min() < 0 or array.max() > self._limit):
            raise ValueError(f"token id out of range for {self.dtype} (max {self._limit}); "
                             "build with dtype=np.int32 for vocabularies above 65535")
        self._bin.write(array.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sizes.append(array.size)

    def finalize(self) -> None:
        """Write the index and move both files into place (atomically, .idx last)."""
        self._bin.close()
        sizes = np.array(self._sizes, dtype=np.int32)
        pointers = np.zeros(len(sizes), dtype=np.int64)
        np.cumsum(sizes[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= self.dtype.itemsize
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
        with open(f"{self.prefix}.idx{self._tmp}", "wb") as f:
            f.write(_HEADER.pack(MAGIC, VERSION, DTYPE_CODES[self.dtype], len(sizes), len(doc_idx)))
            f.write(sizes.tobytes())
            f.write(pointers.tobytes())
            f.write(doc_idx.tobytes())
        os.replace(f"{self.prefix}.bin{self._tmp}", f"{self.prefix}.bin")
        os.replace(f"{self.prefix}.idx{self._tmp}", f"{self.prefix}.idx")

    def abort(self) -> None:
        """Drop the partial output."""
        self._bin.close()
        for suffix in (".bin", ".idx"):
            Path(f"{self.prefix}{suffix}{self._tmp}").unlink(missing_ok=True)

    def __enter__(self) -> "IndexedDatasetBuilder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


class IndexedDataset:
    """Read-only random access to the documents of prefix.bin/.idx through a memory map."""

    def __init__(self, prefix: str | Path):
        self.prefix = str(prefix)
        idx_path, bin_path = Path(f"{self.prefix}.idx"), Path(f"{self.prefix}.bin")
        for path in (idx_path, bin_path):
            if not path.is_file():
                raise IndexedDatasetError(
                    f"{path} does not exist; build the dataset with megamoe-preprocess "
                    "(data.paths takes the prefix, without .bin/.idx)")
        self.dtype, self.sizes, self.pointers = _read_index(idx_path)
        expected = int(self.sizes.sum(dtype=np.int64)) * self.dtype.itemsize
        actual = bin_path.stat().st_size
        if actual != expected:
            raise IndexedDatasetError(
                f"{bin_path} has {actual} bytes but its index {idx_path} describes {expected}; "
                "the pair is truncated or mismatched: rebuild with megamoe-preprocess")
        # np.memmap cannot map an empty file; an empty dataset has nothing to read anyway.
        self._data = (np.memmap(bin_path, dtype=self.dtype, mode="r") if expected
                      else np.zeros(0, dtype=self.dtype))

    def __len__(self) -> int:
        return len(self.sizes)

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (a read-only view into the memory map)."""
        return self.get(i)

    def max_token(self) -> int:
        """The largest token id in the .bin (-1 when empty): one pass over the file, in chunks."""
        chunk = 1 << 26
        return max((int(self._data[i:i + chunk].max()) for i in range(0, len(self._data), chunk)), default=-1)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of document i; length None = to the end."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"document {i} out of range for {len(self)} documents")
        size = int(self.sizes[i])
        length = size - offset if length is None else length
        assert 0 <= offset and offset + length <= size, (i, offset, length, size)
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._data[start:start + length]


def _read_index(path: Path) -> tuple[np.dtype, np.ndarray, np.ndarray]:
    """Parse and check a .idx file → (dtype, sizes int32[n], pointers int64[n])."""
    raw = path.read_bytes()
    if len(raw) < _HEADER.size or raw[:len(MAGIC)] != MAGIC:
        raise IndexedDatasetError(f"{path} is not an indexed-dataset index (bad header); "
                                  "rebuild it with megamoe-preprocess")
    _, version, code, n, n_doc_idx = _HEADER.unpack_from(raw)
    if version != VERSION or code not in CODE_DTYPES:
        raise IndexedDatasetError(f"{path} has version {version} / dtype code {code}, which this "
                                  f"reader does not know (expects version {VERSION}); rebuild it")
    expected = _HEADER.size + 4 * n + 8 * n + 8 * n_doc_idx
    if len(raw) != expected:
        raise IndexedDatasetError(
            f"{path} has {len(raw)} bytes but its header implies {expected}; it is truncated "
            "or corrupt: rebuild with megamoe-preprocess")
    dtype = CODE_DTYPES[code]
    sizes = np.frombuffer(raw, dtype=np.int32, count=n, offset=_HEADER.size)
    pointers = np.frombuffer(raw, dtype=np.int64, count=n, offset=_HEADER.size + 4 * n)
    expected_pointers = np.zeros(n, dtype=np.int64)
    np.cumsum(sizes[:-1], dtype=np.int64, out=expected_pointers[1:])
    if (sizes < 0).any() or not np.array_equal(pointers, expected_pointers * dtype.itemsize):
        raise IndexedDatasetError(f"{path} has inconsistent sizes/pointers; it is corrupt: "
                                  "rebuild with megamoe-preprocess")
    return dtype, sizes, pointers
