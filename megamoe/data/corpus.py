"""The embedded default corpus: the Python standard library every machine already has.

Each stdlib module gives up to two documents, one per domain, so the routing analysis has
two kinds of text to tell apart:
  code  the module's source with its docstrings removed
  docs  the module's docstrings (English prose), joined by blank lines
Files are visited in sorted path order, so the corpus is the same on every machine with
the same Python version.
"""

import ast
import io
import json
import os
import sysconfig
import tokenize
from collections.abc import Iterable, Iterator
from pathlib import Path

# Directories that hold tests, generated tables or third-party code rather than the library.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings",
             "lib-dynload", "pydoc_data", "turtledemo", "ensurepip", "__phello__"}
MAX_FILE_BYTES = 256 * 1024  # larger files are generated data, not representative source
MIN_DOCSTRING_CHARS = 40  # shorter ones ("Return x.") add little English


def stdlib_root() -> Path:
    """Where this interpreter's standard library lives."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Stdlib *.py files in sorted order, without tests and oversized files."""
    root = root or stdlib_root()
    files = []
    for folder, subdirs, names in os.walk(root):
        # Prune in place so os.walk never descends into site-packages or the test suite.
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith("config-")]
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    return sorted(p for p in files if p.stat().st_size <= MAX_FILE_BYTES)


def split_docstrings(source: str) -> tuple[str, list[str]]:
    """Source → (source without docstrings, the docstrings in order).

    A docstring that is the only statement of its body is replaced by `...` so the code
    keeps its shape; docstrings sharing a line with other code are left in place.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    docstrings, drop, ellipsis_at = [], set(), {}
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node, clean=True)
        if doc is None:
            continue
        docstrings.append(doc)
        expr = node.body[0]
        first, last = expr.lineno - 1, expr.end_lineno - 1
        alone = (lines[first][:expr.col_offset].strip() == ""
                 and lines[last][expr.end_col_offset:].strip() in ("", ";"))
        if not alone:
            continue
        drop.update(range(first, last + 1))
        if len(node.body) == 1:
            ellipsis_at[first] = " " * expr.col_offset + "...\n"
    code = "".join(ellipsis_at.get(i, line) for i, line in enumerate(lines)
                   if i not in drop or i in ellipsis_at)
    return code, docstrings


def _read_source(path: Path) -> str | None:
    """The file's text decoded per its coding cookie, or None if it is not valid Python."""
    try:
        raw = path.read_bytes()
        encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
        return raw.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError):
        return None


def iter_stdlib_documents(max_bytes: int | None = None, root: Path | None = None) -> Iterator[dict]:
    """Yield {"text", "domain"} documents from the stdlib until `max_bytes` of UTF-8 text."""
    total = 0
    for path in stdlib_files(root):
        source = _read_source(path)
        if source is None:
            continue
        try:
            code, docstrings = split_docstrings(source)
        except SyntaxError:
            continue
        prose = "\n\n".join(d for d in docstrings if len(d) >= MIN_DOCSTRING_CHARS)
        for text, domain in ((code, "code"), (prose, "docs")):
            if not text.strip():
                continue
            yield {"text": text, "domain": domain}
            total += len(text.encode("utf-8"))
            if max_bytes is not None and total >= max_bytes:
                return


def write_jsonl(docs: Iterable[dict], path: str | Path) -> int:
    """Write one JSON object per line; returns the number of documents written."""
    count = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")
            count += 1
    return count
