"""Tokenizers: a sentencepiece .model or a Hugging Face tokenizer.json behind one interface.

`load_tokenizer(path)` picks the implementation from the file; `train_sentencepiece` builds a
byte-fallback BPE model (every UTF-8 string round-trips exactly, code indentation included).
"""

import itertools
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import sentencepiece as spm
import tokenizers

# Special-token spellings tried, in order, for a tokenizer.json that does not say which is which.
EOS_NAMES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]")
BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class Tokenizer:
    """What the data pipeline and trainer need from a tokenizer."""

    vocab_size: int
    eos_id: int
    pad_id: int  # the EOS id when the vocabulary has no pad token
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece .model file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise ValueError(f"tokenizer {path} has no end-of-sequence piece; retrain it with "
                             "megamoe-tokenizer (which sets one)")
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id
        self.bos_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else None

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizers` tokenizer.json file."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.tok = tokenizers.Tokenizer.from_file(self.path)
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        eos = self._first_id(EOS_NAMES)
        if eos is None:
            raise ValueError(f"tokenizer {path} has none of the end-of-sequence tokens "
                             f"{', '.join(EOS_NAMES)}; add one (e.g. '</s>') as a special token")
        self.eos_id = eos
        pad = self._first_id(PAD_NAMES)
        self.pad_id = eos if pad is None else pad
        self.bos_id = self._first_id(BOS_NAMES)

    def _first_id(self, names: tuple[str, ...]) -> int | None:
        for name in names:
            token_id = self.tok.token_to_id(name)
            if token_id is not None:
                return token_id
        return None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Open a sentencepiece .model or a tokenizer.json, chosen by the file's contents."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a sentencepiece "
                                ".model or a tokenizer.json (megamoe-tokenizer makes one)")
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"{"):
        try:
            return HFTokenizer(path)
        except Exception as e:  # tokenizers raises its own exception types
            raise ValueError(f"tokenizer file {path} looks like JSON but is not a valid "
                             f"tokenizer.json ({e}); save it with tokenizer.save(path)") from None
    try:
        return SentencePieceTokenizer(path)
    except (RuntimeError, OSError):
        raise ValueError(f"tokenizer file {path} is neither a sentencepiece .model nor a "
                         "tokenizer.json; pass one of those") from None


def iter_texts(paths: Iterable[str | Path], json_key: str = "text") -> Iterator[str]:
    """Texts from .jsonl files (the `json_key` field of each line) or whole plain-text files.

    Lines that are not JSON objects with a string `json_key` are skipped; this is for
    tokenizer training, where a few bad lines do not matter (preprocessing reports them).
    """
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"input file {path} " + ("is a folder; give the text or JSONL files in it "
                                    "(e.g. DIR/*.jsonl)" if path.is_dir() else "does not exist"))
        if path.suffix in (".jsonl", ".json"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get(json_key), str):
                        yield record[json_key]
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def train_sentencepiece(input_paths: Iterable[str | Path], model_prefix: str | Path,
                        vocab_size: int, *, json_key: str = "text",
                        input_sentence_size: int = 300_000, num_threads: int | None = None,
                        model_type: str = "bpe", overwrite: bool = False) -> Path:
    """Train a byte-fallback sentencepiece model on text / .jsonl files; returns the .model path.

    Lines are the training sentences (newlines themselves encode as the byte piece <0x0A>);
    whitespace is kept verbatim so code round-trips. At most `input_sentence_size` lines,
    sampled at random, are used, which keeps training to seconds. Ids: unk 0, bos 1, eos 2,
    pad 3. An existing model_prefix.model/.vocab is replaced only with `overwrite`.
    """
    if vocab_size < 300:
        raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte-fallback pieces and "
                         "4 specials are always in the vocabulary; use at least 300")
    model_prefix = Path(model_prefix)
    if not overwrite and any(Path(f"{model_prefix}{s}").exists() for s in (".model", ".vocab")):
        raise FileExistsError(f"{model_prefix}.model/.vocab already exist; choose another model "
                              "prefix or pass --overwrite to replace them")
    input_paths = list(input_paths)
    lines = (line for text in iter_texts(input_paths, json_key)
             for line in text.split("\n") if line.strip())
    first = next(lines, None)
    if first is None:  # sentencepiece would only say "!sentences_.empty()"
        json_input = any(Path(p).suffix in (".jsonl", ".json") for p in input_paths)
        raise ValueError(f"no usable documents in {', '.join(map(str, input_paths))}"
                         + (f" (check --json-key {json_key!r}: no JSONL line has text in a string "
                            f"{json_key!r} field)" if json_input else ""))
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=itertools.chain([first], lines), model_prefix=str(model_prefix),
            vocab_size=vocab_size, model_type=model_type, byte_fallback=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True,
            input_sentence_size=input_sentence_size, shuffle_input_sentence=True,
            max_sentence_length=16384, num_threads=num_threads or os.cpu_count() or 1,
            unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    except RuntimeError as e:
        if "Vocabulary size too high" in str(e):
            raise ValueError(f"the training text is too small for vocab_size={vocab_size} "
                             f"(sentencepiece: {str(e).split('] ')[-1]}); lower vocab_size "
                             "or give more text") from None
        raise
    return Path(f"{model_prefix}.model")
