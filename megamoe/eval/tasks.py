"""Downstream tasks: multiple-choice items from local JSONL files, or built in.

One item per line: `{"context": str, "choices": [str, ...], "gold": int}`. A choice is scored
as the text that follows the context verbatim, so it carries its own leading space where the
source has one (" Paris"); `gold` indexes the right choice. A completion task has
`{"context": str, "answer": str}` items instead, scored by exact match: is the answer the
model's greedy continuation (each of its tokens the argmax after the ones before)? A task is
named by a spec:

    next_line             the built-in task (megamoe/eval/next_line.py)
    data/arc_easy.jsonl   a file; the task is named after it (arc_easy)
    SPEC:mc               the same items in the multiple-choice letter format (arc_easy_mc)

Two formats, as OLMES scores them: cloze (each choice's log-likelihood after the context;
`acc` takes the largest, `acc_norm` the largest per character) and the letter format (the
choices listed as " A. ...", " B. ..." after the context, then "Answer:", scored over " A",
" B", ...: `acc`).
"""

import json
from dataclasses import dataclass
from pathlib import Path

FORMATS = ("cloze", "mc")  # of multiple-choice tasks; a file of answers makes a "completion" task
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskError(ValueError):
    """A task spec or file that cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...]  # a completion item: (answer,)
    gold: int


@dataclass(frozen=True)
class Task:
    name: str
    format: str  # cloze | mc | completion
    items: tuple[Item, ...]


def letter_format(item: Item) -> Item:
    """The item as a multiple-choice question: the choices listed under letters, answered by one."""
    listed = "".join(f"\n {LETTERS[i]}. {c.strip()}" for i, c in enumerate(item.choices))
    return Item(f"{item.context.rstrip()}{listed}\nAnswer:",
                tuple(f" {LETTERS[i]}" for i in range(len(item.choices))), item.gold)


def parse_item(record, where: str) -> tuple[Item, bool]:
    """One JSONL record -> (Item, whether it is a completion item), or a TaskError naming `where`
    (file:line) and what is wrong."""
    fix = 'each line must be {"context": str, "choices": [str, ...], "gold": int} or {"context": str, "answer": str}'
    if not isinstance(record, dict):
        raise TaskError(f"{where}: not a JSON object; {fix}")
    context, choices, gold = record.get("context"), record.get("choices"), record.get("gold")
    if not isinstance(context, str) or not context:
        raise TaskError(f"{where}: 'context' must be a non-empty string; {fix}")
    if "answer" in record:
        if not isinstance(record["answer"], str) or not record["answer"]:
            raise TaskError(f"{where}: 'answer' must be a non-empty string; {fix}")
        return Item(context, (record["answer"],), 0), True
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c for c in choices)):
        raise TaskError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings; {fix}")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise TaskError(f"{where}: 'gold' must be an index into the {len(choices)} choices, got {gold!r}")
    return Item(context, tuple(choices), gold), False


def read_jsonl(path: Path) -> tuple[list[Item], bool]:
    """(items, whether they are completion items): a file holds one kind."""
    if not path.is_file():
        raise TaskError(f"task file {path} does not exist; give a JSONL file of "
                        '{"context", "choices", "gold"} items or a built-in task (next_line)')
    items, kinds = [], set()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not valid JSON ({e.msg}); write one JSON object per line") from None
            item, completion = parse_item(record, f"{path}:{n}")
            kinds.add(completion)
            if len(kinds) > 1:
                raise TaskError(f"{path}:{n}: mixes completion items (with 'answer') and multiple-choice "
                                "items (with 'choices'); put each kind in its own file")
            items.append(item)
    if not items:
        raise TaskError(f"{path} holds no items; write one JSON object per line")
    return items, kinds == {True}


def split_spec(spec: str) -> tuple[str, str]:
    """'SOURCE[:FORMAT]' -> (source, format)."""
    source, sep, fmt = spec.rpartition(":")
    if sep and fmt in FORMATS:
        return source, fmt
    return spec, "cloze"


def check_spec(spec: str) -> None:
    """Cheap check of a spec (no file is read): a built-in name or a .jsonl path."""
    source, _ = split_spec(spec)
    if source not in builtin_tasks() and not source.endswith(".jsonl"):
        raise TaskError(f"{spec!r} is neither a built-in task ({', '.join(builtin_tasks())}) nor a "
                        ".jsonl file; optionally add :mc for the letter format")


def builtin_tasks() -> dict:
    from .next_line import next_line_items
    return {"next_line": next_line_items}


def load_task(spec: str, limit: int | None = None) -> Task:
    """The task a spec names, its first `limit` items only when given."""
    check_spec(spec)
    source, fmt = split_spec(spec)
    builtins = builtin_tasks()
    if source in builtins:
        name, items, completion = source, builtins[source](**({"n": limit} if limit else {})), False
    else:
        (items, completion), name = read_jsonl(Path(source)), Path(source).stem
        items = items[:limit]
    if completion:
        if spec != source:
            raise TaskError(f"{spec}: {source} holds completion items, which have no letter format; drop :{fmt}")
        return Task(name, "completion", tuple(items))
    if fmt == "mc":
        name, items = f"{name}_mc", [letter_format(i) for i in items]
    return Task(name, fmt, tuple(items))
