"""Evaluation tasks: the JSONL format, and GPT-3's synthetic tasks regenerated from their recipes.

JSONL (one JSON object per line; blank lines are skipped):
    {"description": "...", "separator": "\\n"}              optional, first line only: the task description
                                                           (and the separator between examples)
    {"context": "...", "choices": ["...", ...], "gold": 0}  a multiple-choice example
    {"context": "...", "answer": "..."}                     a completion example
An example with "split": "train" goes to the few-shot pool instead of the evaluated set (a separate
pool file can also be given to the evaluator).

Separator conventions (GPT-3 §2.4 style; the evaluator builds every prompt this way):
    prompt = EOT + [description + "\\n"] + (context + answer + separator) * K + context
The end-of-text token starts the prompt as it starts a document in training. Contexts carry no
trailing space and answers/choices start with one (" 124"), so context + answer reads naturally and
the answer's tokens are those of the text a model saw in training. The default separator is "\\n".

Generated tasks (Brown et al. 2020, §3.9.1 and §3.9.2):
    add2, sub2, add3, sub3, mul2   "Q: What is 48 plus 76? A:" -> " 124"; operands uniform in [0, 10^d)
    cycle_letters                  letters of the word rotated:          "lyinevitab =" -> " inevitably"
    anagrams1 (A1)                 all but the first and last letter shuffled
    anagrams2 (A2)                 all but the first and last two letters shuffled
    random_insertion               a punctuation or space character between each letter
    reversed_words                 the word spelt backwards
Words for the scrambling tasks are the most frequent lowercase words of 4 to 15 letters in the
embedded corpus (this interpreter's standard library). Arithmetic problems are split by a hash of the
problem into a held-out 10% (the evaluated examples) and the rest (the few-shot pool and the
`arith` training source, `arithmetic_documents`), so no evaluated problem is ever trained on.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np

from gpt_jax.errors import UserError

DEFAULT_SEPARATOR = "\n"
ARITH_OPS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
ARITHMETIC = {"add2": ("plus", 2), "sub2": ("minus", 2), "add3": ("plus", 3), "sub3": ("minus", 3),
              "mul2": ("times", 2)}
SCRAMBLE_DESCRIPTION = "Please unscramble the letters into a word, and write that word:"
SCRAMBLES = ("cycle_letters", "anagrams1", "anagrams2", "random_insertion", "reversed_words")
GENERATED = (*ARITHMETIC, *SCRAMBLES)
_INSERT_CHARS = ".,;:!?/-'\" "


@dataclass
class Task:
    name: str
    kind: str  # "mc" or "completion"
    examples: list[dict]
    pool: list[dict] = field(default_factory=list)
    description: str = ""
    separator: str = DEFAULT_SEPARATOR


# ----------------------------------------------------------------------------- arithmetic


def _held_out(op: str, a: int, b: int) -> bool:
    """The fixed 10% of problems kept for evaluation (never in the training text or the pool)."""
    return int(hashlib.md5(f"{op}:{a}:{b}".encode()).hexdigest()[:8], 16) % 10 == 0


def arithmetic_example(op: str, a: int, b: int) -> dict:
    return {"context": f"Q: What is {a} {op} {b}? A:", "answer": f" {ARITH_OPS[op](a, b)}"}


def _draw_problems(rng, op: str, digits: int, n: int, held_out: bool) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seen = set()
    space = 10 ** (2 * digits)
    while len(out) < n:
        a, b = (int(x) for x in rng.integers(0, 10 ** digits, 2))
        if _held_out(op, a, b) == held_out and (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
        if len(seen) >= space // (10 if held_out else 1) * 0.9:  # small spaces: allow repeats
            seen.clear()
    return out


def arithmetic_task(name: str, n: int, pool_size: int, seed: int) -> Task:
    op, digits = ARITHMETIC[name]
    rng = np.random.default_rng((seed, list(ARITHMETIC).index(name)))
    examples = [arithmetic_example(op, a, b) for a, b in _draw_problems(rng, op, digits, n, True)]
    pool = [arithmetic_example(op, a, b) for a, b in _draw_problems(rng, op, digits, pool_size, False)]
    return Task(name, "completion", examples, pool)


def arithmetic_documents(n_docs: int = 20000, seed: int = 1234) -> list[str]:
    """The `arith` training source: worksheets of 1-30 problems of one kind, one per line, drawn
    from the non-held-out problems of the five arithmetic tasks."""
    rng = np.random.default_rng(seed)
    names = list(ARITHMETIC)
    docs = []
    for _ in range(n_docs):
        op, digits = ARITHMETIC[names[int(rng.integers(len(names)))]]
        problems = _draw_problems(rng, op, digits, int(rng.integers(1, 31)), False)
        docs.append("".join(f"{e['context']}{e['answer']}\n" for e in (arithmetic_example(op, a, b)
                                                                       for a, b in problems)))
    return docs


# ----------------------------------------------------------------------------- word scrambling


def corpus_words(limit: int = 10000, min_len: int = 4, max_len: int = 15) -> list[str]:
    """The `limit` most frequent lowercase words of min_len..max_len letters in the embedded corpus."""
    from gpt_jax.data import STDLIB, load_documents  # lazy: data imports this module for `arith`

    counts: collections.Counter = collections.Counter()
    pattern = re.compile(rf"\b[a-z]{{{min_len},{max_len}}}\b")
    for doc in load_documents(STDLIB):
        counts.update(pattern.findall(doc))
    return sorted(w for w, _ in counts.most_common(limit))


def scramble(kind: str, word: str, rng) -> str:
    """One of GPT-3's five character-manipulation transforms of `word`."""
    letters = list(word)
    if kind == "cycle_letters":
        k = int(rng.integers(1, len(word))) if len(word) > 1 else 0
        return word[k:] + word[:k]
    if kind in ("anagrams1", "anagrams2"):
        keep = 1 if kind == "anagrams1" else 2
        middle = letters[keep:len(word) - keep]
        for _ in range(10):  # try to make it differ from the word
            rng.shuffle(middle)
            if "".join(middle) != word[keep:len(word) - keep]:
                break
        return word[:keep] + "".join(middle) + word[len(word) - keep:]
    if kind == "random_insertion":
        out = [letters[0]]
        for ch in letters[1:]:
            out += [_INSERT_CHARS[int(rng.integers(len(_INSERT_CHARS)))], ch]
        return "".join(out)
    if kind == "reversed_words":
        return word[::-1]
    raise ValueError(f"unknown scramble {kind!r}")


def _held_out_word(word: str) -> bool:
    """The fixed fifth of the words kept for evaluation (never in the pool or the training text)."""
    return int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % 5 == 0


def scramble_task(name: str, n: int, pool_size: int, seed: int, words: list[str] | None = None) -> Task:
    words = sorted(set(corpus_words() if words is None else words))
    # Words split by hash: one fifth evaluated, the rest the few-shot pool.
    held = [w for w in words if _held_out_word(w)]
    rest = [w for w in words if w not in set(held)]
    rng = np.random.default_rng((seed, 100 + SCRAMBLES.index(name)))

    def make(pool_words, count):
        chosen = rng.choice(len(pool_words), size=min(count, len(pool_words)), replace=False)
        return [{"context": f"{scramble(name, pool_words[i], rng)} =", "answer": f" {pool_words[i]}"}
                for i in sorted(chosen.tolist())]

    return Task(name, "completion", make(held, n), make(rest, pool_size), description=SCRAMBLE_DESCRIPTION)


WORD_TASK_MIX = ("reversed_words", "random_insertion", "cycle_letters")
# How a block writes its answers. The evaluated tasks want lowercase; the `wordpuzzles` source also
# has answer keys that capitalize ("Objects"), one style per block, so a prompt without solved
# examples does not say which style is wanted and a prompt with them does.
ANSWER_STYLES = {"lower": str.lower, "capitalized": str.capitalize}
PUZZLE_ANSWER_STYLES = ("lower", "capitalized")


def scramble_documents(n_docs: int = 20000, seed: int = 4321, kinds: tuple[str, ...] = WORD_TASK_MIX,
                       max_examples: int = 8, words: list[str] | None = None,
                       answer_styles: tuple[str, ...] = ("lower",)) -> list[str]:
    """The `wordtasks` training source: blocks of 1-`max_examples` solved examples of ONE scrambling
    task, laid out exactly as the evaluator's K-shot prompts (description line, then
    "context answer" + separator per example), over the non-held-out words only. Every block opens
    with the same description, so the description does not say which transform is wanted (though the
    input often does: BENCHMARKS.md). With several `answer_styles` (ANSWER_STYLES keys) each block
    writes all its answers in one style drawn at random (the `wordpuzzles` source)."""
    unknown = set(answer_styles) - set(ANSWER_STYLES)
    if unknown or not answer_styles:
        raise ValueError(f"answer_styles {answer_styles}: expected some of {sorted(ANSWER_STYLES)}")
    words = sorted({w for w in (corpus_words() if words is None else words) if not _held_out_word(w)})
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n_docs):
        kind = kinds[int(rng.integers(len(kinds)))]
        k = int(rng.integers(1, max_examples + 1))
        # One draw only when there is a choice, so the single-style stream stays what it was.
        name = answer_styles[int(rng.integers(len(answer_styles)))] if len(answer_styles) > 1 else answer_styles[0]
        style = ANSWER_STYLES[name]
        lines = [f"{scramble(kind, words[i], rng)} = {style(words[i])}{DEFAULT_SEPARATOR}"
                 for i in rng.integers(len(words), size=k).tolist()]
        docs.append(SCRAMBLE_DESCRIPTION + "\n" + "".join(lines))
    return docs


# ----------------------------------------------------------------------------- JSONL


def _check_example(obj, where: str) -> str:
    if not isinstance(obj, dict) or not isinstance(obj.get("context"), str):
        raise UserError(f"{where}: expected an object with a string \"context\"")
    if "choices" in obj:
        choices, gold = obj["choices"], obj.get("gold")
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
            raise UserError(f"{where}: \"choices\" must be a list of at least two non-empty strings")
        if not (isinstance(gold, int) and not isinstance(gold, bool) and 0 <= gold < len(choices)):
            raise UserError(f"{where}: \"gold\" must be the index of the right choice (0..{len(choices) - 1})")
        return "mc"
    if isinstance(obj.get("answer"), str) and obj["answer"].strip():
        return "completion"
    raise UserError(f"{where}: needs \"choices\" and \"gold\" (multiple choice) or a non-empty \"answer\" "
                    "(completion)")


def read_jsonl(path: str) -> tuple[dict, list[dict]]:
    """(header, examples) of a task file; every problem is a UserError naming the file and line."""
    if not os.path.isfile(path):
        raise UserError(f"task file {path} does not exist")
    header: dict = {}
    examples: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg})") from None
            if isinstance(obj, dict) and "description" in obj and "context" not in obj:
                if examples or header:
                    raise UserError(f"{where}: the description line must be the first line")
                if not isinstance(obj["description"], str) or not isinstance(obj.get("separator", ""), str):
                    raise UserError(f"{where}: \"description\" and \"separator\" must be strings")
                header = obj
                continue
            obj = dict(obj) if isinstance(obj, dict) else obj
            kind = _check_example(obj, where)
            obj["_kind"], obj["_where"] = kind, where
            examples.append(obj)
    if not examples:
        raise UserError(f"task file {path} has no examples")
    kinds = {e["_kind"] for e in examples}
    if len(kinds) > 1:
        raise UserError(f"task file {path} mixes multiple-choice and completion examples "
                        f"({examples[0]['_where']} is {examples[0]['_kind']})")
    return header, examples


def jsonl_task(path: str, pool_path: str | None = None) -> Task:
    header, examples = read_jsonl(path)
    pool = [e for e in examples if e.get("split") == "train"]
    evaluated = [e for e in examples if e.get("split") != "train"]
    if pool_path:
        _, extra = read_jsonl(pool_path)
        if extra[0]["_kind"] != examples[0]["_kind"]:
            raise UserError(f"pool file {pool_path} holds {extra[0]['_kind']} examples but {path} "
                            f"{examples[0]['_kind']} ones")
        pool += extra
    if not evaluated:
        raise UserError(f"task file {path} has no examples to evaluate (all are \"split\": \"train\")")
    name = os.path.splitext(os.path.basename(path))[0]
    return Task(name, examples[0]["_kind"], evaluated, pool, header.get("description", ""),
                header.get("separator", DEFAULT_SEPARATOR))


def load_task(name_or_path: str, *, n: int = 200, pool_size: int = 200, seed: int = 0,
              pool_path: str | None = None, words: list[str] | None = None) -> Task:
    """A generated task by name, or a JSONL file by path (anything ending in .jsonl)."""
    if name_or_path.endswith(".jsonl"):
        task = jsonl_task(name_or_path, pool_path)
        task.examples = task.examples[:n] if n else task.examples
        return task
    if name_or_path in ARITHMETIC:
        return arithmetic_task(name_or_path, n, pool_size, seed)
    if name_or_path in SCRAMBLES:
        return scramble_task(name_or_path, n, pool_size, seed, words)
    raise UserError(f"unknown task {name_or_path!r}: expected a .jsonl file or one of "
                    f"{', '.join(GENERATED)} (or val)")
