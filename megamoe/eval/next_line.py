"""The built-in task `next_line`: which of four lines comes next in a standard-library file?

Every machine has the Python standard library (the embedded corpus, megamoe/data/corpus.py), so
every machine can run this task offline. An item is `CONTEXT_LINES` consecutive non-blank lines
of a module's code (docstrings removed, as in the corpus) and four choices: the true next line
and three other lines of the same file (none of them in the context). Files and lines are drawn by a seeded generator, so the
items are the same on every machine with the same Python version. The true line is drawn like
the others, so a model that ignores the context (or a random one) scores 1/4.
"""

import random

from ..data.corpus import _read_source, split_docstrings, stdlib_files
from .tasks import Item

N_ITEMS = 400
CONTEXT_LINES = 4
MAX_LINE_CHARS = 60  # long lines would crowd the context out of short evaluation windows
ITEMS_PER_FILE = 2
SEED = 0


def _code_lines(path) -> list[str]:
    source = _read_source(path)
    try:
        code = split_docstrings(source)[0] if source is not None else ""
    except SyntaxError:
        return []
    return [line for line in code.splitlines() if line.strip()]


def next_line_items(n: int = N_ITEMS, seed: int = SEED) -> list[Item]:
    rng = random.Random(seed)
    files = stdlib_files()
    rng.shuffle(files)
    items = []
    for path in files:
        lines = _code_lines(path)
        short = sorted({line for line in lines if len(line) <= MAX_LINE_CHARS})
        for _ in range(ITEMS_PER_FILE):
            if len(items) == n or len(lines) <= CONTEXT_LINES or len(short) < 8:
                break
            i = rng.randrange(CONTEXT_LINES, len(lines))
            if len(lines[i]) > MAX_LINE_CHARS:
                continue
            others = [s for s in short if s != lines[i] and s not in lines[i - CONTEXT_LINES:i]]
            if len(others) < 3:
                continue
            choices = [lines[i], *rng.sample(others, 3)]
            rng.shuffle(choices)
            context = "\n".join(lines[i - CONTEXT_LINES:i]) + "\n"
            items.append(Item(context, tuple(choices), choices.index(lines[i])))
        if len(items) == n:
            break
    return items
