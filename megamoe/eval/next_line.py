"""The built-in task `next_line`: at which indentation does the next line of a stdlib file start?

Every machine has the Python standard library (the embedded corpus, megamoe/data/corpus.py), so
every machine can run this task offline. An item is `CONTEXT_LINES` consecutive non-blank lines
of a module's code (docstrings removed, as in the corpus) and four choices: the true next line
indented by 0, 4, 8 and 12 spaces. Only the code before it tells which is right (a block opens
after a colon, closes after a return...). Items come in groups of four from one file, one per
true indentation, so a scorer that ignores the context and always prefers one indentation (a
random model) scores exactly 1/4. (Whole lines as choices were tried first: their likelihoods
differ by tens of nats, and the small models of the tests and the quick start then chose the
same line whatever the context.) Files and lines come from a seeded generator: the items, and
the first N of them, are the same on every machine with the same Python version. Its metric
is `acc`: per character, more indentation reads as more likely text.
"""

import random

from ..data.corpus import _read_source, split_docstrings, stdlib_files
from .tasks import Item

N_ITEMS = 400
CONTEXT_LINES = 4
MAX_LINE_CHARS = 60  # long lines would crowd the context out of short evaluation windows
LEVELS = (0, 4, 8, 12)
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
        at = {k: [i for i in range(CONTEXT_LINES, len(lines)) if len(lines[i]) <= MAX_LINE_CHARS
                  and len(lines[i]) - len(lines[i].lstrip()) == k] for k in LEVELS}
        if not all(at.values()):
            continue
        for gold, k in enumerate(LEVELS):
            i = rng.choice(at[k])
            body = lines[i].lstrip()
            items.append(Item("\n".join(lines[i - CONTEXT_LINES:i]) + "\n",
                              tuple(" " * level + body for level in LEVELS), gold))
        if len(items) >= n:
            return items[:n]
    return items
