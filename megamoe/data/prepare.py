"""Turning text into indexed datasets: `preprocess` for user files, and the embedded corpus.

`preprocess` reads JSONL (one {"text": ...} object per line) or plain-text files (one
document per file), tokenizes with worker processes, appends EOS to every document and
writes prefix.bin/.idx. Bad input (malformed JSON, empty documents, bytes that are not
UTF-8) is skipped and reported by file:line, or is an error with `strict=True`.

For fine-tuning, `prompt_key` names a second JSONL field: a document is then the prompt's
tokens followed by the completion's (`json_key`) and EOS, and prefix.lossmask.bin/.idx marks
the completion and EOS as the only targets the loss counts. `messages_key` reads chat
conversations instead ([{"role", "content"}, ...]), rendered in the Tulu / OLMoE-Instruct
format (`render_chat`); the assistant turns and their EOS are the targets.

`ensure_default_corpus` builds the stdlib corpus, its tokenizer and its dataset once per
cache key; concurrent callers (every rank of a job) wait on a file lock and share the result.
"""

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sentencepiece as spm
from tqdm import tqdm

from megamoe.data.corpus import iter_stdlib_documents, stdlib_root, write_jsonl
from megamoe.data.indexed import IndexedDatasetBuilder, dataset_exists, dtype_for_vocab, loss_mask_prefix
from megamoe.data.tokenizer import load_tokenizer, train_sentencepiece

log = logging.getLogger(__name__)

DEFAULT_VOCAB_SIZE = 4096
DEFAULT_MAX_BYTES = 12 * 1024 * 1024  # the whole 3.11 stdlib is ~9.5 MB; builds in seconds
CORPUS_FORMAT = 1  # bump when the corpus, tokenizer or dataset recipe changes
JSON_SUFFIXES = (".jsonl", ".json")
MAX_EXAMPLES = 5  # file:line locations kept per kind of bad input


class BadInputError(ValueError):
    """A line of input cannot be used (strict mode); the message names file:line."""


@dataclass
class PreprocessReport:
    """What preprocessing wrote and what it skipped."""

    documents: int = 0
    tokens: int = 0
    targets: int = 0  # tokens the loss counts (all of them without a prompt key)
    skipped: Counter = field(default_factory=Counter)  # problem -> count
    examples: dict = field(default_factory=dict)  # problem -> first few "file:line"

    def skip(self, path: Path, line: int, problem: str, strict: bool) -> None:
        if strict:
            raise BadInputError(f"{path}:{line}: {problem} (drop --strict to skip and count "
                                "such lines instead)")
        self.skipped[problem] += 1
        where = self.examples.setdefault(problem, [])
        if len(where) < MAX_EXAMPLES:
            where.append(f"{path}:{line}")

    def problems(self) -> str:
        """One line per kind of skipped input, with its first locations; '' if none."""
        lines = []
        for problem, count in self.skipped.most_common():
            more = ", ..." if count > len(self.examples[problem]) else ""
            lines.append(f"skipped {count} × {problem}: {', '.join(self.examples[problem])}{more}")
        return "\n".join(lines)


CHAT_ROLES = ("system", "user", "assistant")


def render_chat(messages: list[dict]) -> list[tuple[str | None, bool]]:
    """A conversation → segments (text, is_target); text None stands for EOS.

    The Tulu / OLMoE-Instruct format: "<|role|>\n" + content + "\n" per turn; an assistant
    turn's content ends with EOS instead of the newline. Only assistant contents and their EOS
    are targets, so the model learns to answer and to stop, never to write the user's turns.
    """
    segments = []
    for m in messages:
        if m["role"] == "assistant":
            segments += [("<|assistant|>\n", False), (m["content"], True), (None, True)]
        else:
            segments += [(f"<|{m['role']}|>\n{m['content']}\n", False)]
    return segments


def _parse_messages(record: dict, key: str):
    """(segments, None) from a chat record, or (None, problem)."""
    messages = record.get(key)
    if not isinstance(messages, list) or not messages:
        return None, f"no list {key!r} field"
    for m in messages:
        if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES and isinstance(m.get("content"), str)):
            return None, f"a message that is not {{\"role\": {'|'.join(CHAT_ROLES)}, \"content\": str}}"
        if not _is_utf8(m["content"]):
            return None, "not UTF-8"
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        return None, "no assistant turn (nothing to learn)"
    return render_chat(messages), None


def _parse_json_line(raw: bytes, json_key: str, prompt_key: str | None = None,
                     messages_key: str | None = None):
    """One JSONL line → (text, None), or (None, problem); a blank line is (None, None).

    With `prompt_key` or `messages_key`, text is a list of segments (text, is_target), text
    None standing for EOS; a prompt may be empty."""
    if not raw.strip():
        return None, None
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "not UTF-8"
    except json.JSONDecodeError:
        return None, "malformed JSON"
    if not isinstance(record, dict):
        return None, "not a JSON object"
    if messages_key is not None:
        return _parse_messages(record, messages_key)
    if not isinstance(record.get(json_key), str):
        return None, f"no string {json_key!r} field"
    if prompt_key is None:
        return _check_text(record[json_key])
    if not isinstance(record.get(prompt_key), str):
        return None, f"no string {prompt_key!r} field"
    completion, problem = _check_text(record[json_key])
    if problem:
        return None, problem if problem != "empty document" else f"empty {json_key!r} (nothing to learn)"
    prompt = record[prompt_key]
    if not _is_utf8(prompt):  # may be empty, but not broken
        return None, "not UTF-8"
    return [(prompt, False), (completion, True), (None, True)], None


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")  # JSON escapes can smuggle in lone surrogates
    except UnicodeEncodeError:
        return False
    return True


def _check_text(text: str) -> tuple[str | None, str | None]:
    if not _is_utf8(text):
        return None, "not UTF-8"
    return (text, None) if text.strip() else (None, "empty document")


def read_documents(paths: list[str | Path], json_key: str, strict: bool,
                   report: PreprocessReport, prompt_key: str | None = None,
                   messages_key: str | None = None) -> Iterator[tuple]:
    """Yield (document text, input bytes it came from), recording bad input in `report`.

    With `prompt_key` or `messages_key` (JSONL only), the text is a list of segments."""
    for path in map(Path, paths):
        if path.suffix in JSON_SUFFIXES:
            with open(path, "rb") as f:
                for line_no, raw in enumerate(f, 1):
                    text, problem = _parse_json_line(raw, json_key, prompt_key, messages_key)
                    if problem:
                        report.skip(path, line_no, problem, strict)
                    elif text is not None:
                        yield text, len(raw)
            continue
        if prompt_key is not None or messages_key is not None:
            fields = (f"a {prompt_key!r} and a {json_key!r} field" if prompt_key is not None
                      else f"a {messages_key!r} list")
            raise ValueError(f"{path} is plain text, but fine-tuning data (--prompt-key / "
                             f"--messages-key) must be JSONL (.jsonl/.json) with {fields} per line")
        raw = path.read_bytes()
        try:
            text, problem = _check_text(raw.decode("utf-8"))
            line_no = 1
        except UnicodeDecodeError as e:
            text, problem, line_no = None, "not UTF-8", raw[:e.start].count(b"\n") + 1
        if problem:
            report.skip(path, line_no, problem, strict)
        else:
            yield text, len(raw)


_worker_tokenizer = None


def _init_worker(tokenizer_path: str) -> None:
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(tokenizer_path)


def _encode(item: tuple) -> tuple[list[int], list[int] | None, int]:
    """(text or segments, bytes) → (ids with EOS, loss mask or None, bytes)."""
    text, nbytes = item
    if isinstance(text, str):
        return _worker_tokenizer.encode(text) + [_worker_tokenizer.eos_id], None, nbytes
    ids, mask = [], []
    for piece, target in text:  # tokenized apart, so that no token straddles two segments
        new = [_worker_tokenizer.eos_id] if piece is None else (_worker_tokenizer.encode(piece) if piece else [])
        ids += new
        mask += [int(target)] * len(new)
    return ids, mask, nbytes


def preprocess(input_paths: list[str | Path], output_prefix: str | Path,
               tokenizer_path: str | Path, *, json_key: str = "text", workers: int = 1,
               strict: bool = False, overwrite: bool = False, progress: bool = True,
               prompt_key: str | None = None, messages_key: str | None = None) -> PreprocessReport:
    """Tokenize text / JSONL files into output_prefix.bin/.idx (EOS after every document).

    With `prompt_key`: prompt + completion (`json_key`) + EOS per document; with
    `messages_key`: a rendered conversation (`render_chat`). Either writes
    output_prefix.lossmask.bin/.idx too, 1 on the tokens that are targets."""
    if prompt_key is not None and messages_key is not None:
        raise ValueError("--prompt-key and --messages-key are two formats of fine-tuning data; "
                         "give one of them")
    if workers < 1:
        raise ValueError(f"--workers {workers}: tokenizing needs at least 1 process")
    output_prefix = str(output_prefix)
    mask_prefix = loss_mask_prefix(output_prefix)
    for prefix in (output_prefix, mask_prefix):
        if dataset_exists(prefix) and not overwrite:
            raise FileExistsError(f"{prefix}.bin/.idx already exist; choose another output "
                                  "prefix or pass --overwrite to replace them")
    for path in input_paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"input file {path} " + ("is a folder; give the text or JSONL files in it "
                                    "(e.g. DIR/*.jsonl)" if Path(path).is_dir() else "does not exist"))
    tokenizer = load_tokenizer(tokenizer_path)
    report = PreprocessReport()
    documents = read_documents(input_paths, json_key, strict, report, prompt_key, messages_key)
    fine_tuning = prompt_key is not None or messages_key is not None
    total_bytes = sum(Path(p).stat().st_size for p in input_paths)
    pool = (multiprocessing.Pool(workers, _init_worker, (str(tokenizer_path),))
            if workers > 1 else None)
    if pool is None:
        _init_worker(str(tokenizer_path))
    try:
        encoded = pool.imap(_encode, documents, chunksize=16) if pool else map(_encode, documents)
        keys = (f"--messages-key {messages_key!r}" if messages_key is not None else
                f"--json-key {json_key!r}" + (f" and --prompt-key {prompt_key!r}" if prompt_key else ""))
        with (IndexedDatasetBuilder(output_prefix, dtype_for_vocab(tokenizer.vocab_size)) as builder,
              IndexedDatasetBuilder(mask_prefix, np.uint8) if fine_tuning else nullcontext() as masks,
              tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not progress,
                   desc=f"tokenizing into {output_prefix}") as bar):
            for ids, mask, nbytes in encoded:
                builder.add_document(ids)
                if mask is not None:
                    masks.add_document(mask)
                report.documents += 1
                report.tokens += len(ids)
                report.targets += sum(mask) if mask is not None else len(ids)
                bar.update(nbytes)
            if not report.documents:
                raise ValueError(f"no usable documents in {', '.join(map(str, input_paths))}"
                                 f" (check {keys})\n{report.problems()}")
            if fine_tuning:
                masks.finalize()
            else:  # --overwrite of fine-tuning data with plain text: drop the old mask
                for suffix in (".bin", ".idx"):
                    Path(mask_prefix + suffix).unlink(missing_ok=True)
            builder.finalize()  # the tokens' .idx last: readers look for it first
    finally:
        if pool is not None:
            pool.terminate()
    if report.skipped:
        log.warning("%s", report.problems())
    return report


def default_corpus_dir(cache_dir: str | Path, vocab_size: int, max_bytes: int) -> Path:
    """Where the corpus for these settings lives: keyed by recipe, Python and library versions."""
    key = json.dumps([CORPUS_FORMAT, platform.python_version(), str(stdlib_root()),
                      vocab_size, max_bytes, spm.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return (Path(cache_dir).expanduser()
            / f"stdlib-py{platform.python_version()}-v{vocab_size}-{digest}")


def ensure_default_corpus(cache_dir: str | Path, vocab_size: int = DEFAULT_VOCAB_SIZE,
                          max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[Path, Path]:
    """Build the stdlib corpus once → (indexed dataset prefix, tokenizer .model path).

    The build happens in a private temporary directory renamed into place when complete,
    under an exclusive file lock: other callers wait, then reuse it. Where locks do not
    work (some network filesystems) the rename alone still keeps the result whole.
    """
    final = default_corpus_dir(cache_dir, vocab_size, max_bytes)
    result = final / "corpus", final / "tokenizer.model"
    if final.is_dir():
        return result
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return result
        print(f"megamoe: building the embedded corpus (the Python standard library) and its tokenizer "
              f"in {final}, once; later runs reuse it", flush=True)
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp"))
        try:
            jsonl = tmp / "corpus.jsonl"
            write_jsonl(iter_stdlib_documents(max_bytes), jsonl)
            tokenizer_path = train_sentencepiece([jsonl], tmp / "tokenizer", vocab_size)
            preprocess([jsonl], tmp / "corpus", tokenizer_path, progress=False)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():  # a rename lost to another builder is fine; all else is not
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return result
