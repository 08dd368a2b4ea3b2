"""An offline instruction task where a program plays the human labeler.

Three families of instructions, each with a deterministic scorer in [0, 1] that reads only the
prompt and the response (so any response, from any model, can be judged):

| family    | prompt                         | ideal response | scorer                                                 |
|-----------|--------------------------------|----------------|--------------------------------------------------------|
| `arith`   | `What is 37+48?`               | `85`           | 1 exact; 0.2 a bare integer that is wrong; 0 otherwise |
| `reverse` | `Reverse: 4 9 1`               | `1 9 4`        | positions right / max(len) for a list of digits; else 0|
| `word`    | `One word: opposite of hot?`   | `cold`         | 1 the word; 0.3 one other lowercase word; 0 otherwise  |

The generator writes SFT demonstrations, prompts to rank, PPO prompts and held-out evaluation
prompts. `task.demo_noise` > 0 makes a share of the demonstrations careless, as human ones are: the
right answer wrapped in filler ("A: 85", "so cold", "1 9 4 ok"), which every scorer rates 0 because
it asks for the bare answer. SFT imitates the filler; rankings can teach the model to drop it.
Arithmetic and reverse prompts are split by a hash of their text: evaluation prompts never appear
in any training file. The one-word family has a closed vocabulary, so its evaluation prompts are
drawn from the same list (the skill there is the format and the recall).
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

FAMILIES = ("arith", "reverse", "word")

ANTONYMS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("old", "new"), ("wet", "dry"),
    ("hard", "soft"), ("high", "low"), ("long", "short"), ("light", "dark"), ("full", "empty"),
    ("open", "closed"), ("rich", "poor"), ("early", "late"), ("happy", "sad"), ("strong", "weak"),
    ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"), ("near", "far"), ("left", "right"),
    ("in", "out"), ("true", "false"), ("first", "last"), ("win", "lose"), ("buy", "sell"),
    ("day", "night"), ("push", "pull"), ("black", "white"), ("yes", "no"),
)
_OPPOSITE = {**{a: b for a, b in ANTONYMS}, **{b: a for a, b in ANTONYMS}}
WORDS = tuple(sorted(_OPPOSITE))

_ARITH = re.compile(r"^What is (\d+)([+-])(\d+)\?$")
_REVERSE = re.compile(r"^Reverse: (\d(?: \d)*)$")
_WORD = re.compile(r"^One word: opposite of ([a-z]+)\?$")
_INT = re.compile(r"^-?\d+$")
_DIGITS = re.compile(r"^\d(?: \d)*$")
_ONE_WORD = re.compile(r"^[a-z]+$")


def answer(prompt: str) -> str | None:
    """The ideal response to a task prompt, or None if the prompt is not one of ours."""
    prompt = prompt.strip()
    if m := _ARITH.match(prompt):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if m := _REVERSE.match(prompt):
        return " ".join(reversed(m[1].split()))
    if (m := _WORD.match(prompt)) and m[1] in _OPPOSITE:
        return _OPPOSITE[m[1]]
    return None


def score(prompt: str, response: str) -> float | None:
    """The labeler's judgement of `response` in [0, 1]; None if the prompt is not a task prompt."""
    ideal = answer(prompt)
    if ideal is None:
        return None
    r = response.strip()
    p = prompt.strip()
    if p.startswith("What is"):
        if r == ideal:
            return 1.0
        return 0.2 if _INT.match(r) else 0.0
    if p.startswith("Reverse:"):
        if not _DIGITS.match(r):
            return 0.0
        got, want = r.split(), ideal.split()
        return sum(g == w for g, w in zip(got, want)) / max(len(got), len(want))
    if r == ideal:
        return 1.0
    return 0.3 if _ONE_WORD.match(r) else 0.0


# A careless demonstrator's wrappers: short, so a wrapped six-digit reversal still fits 16 tokens.
CARELESS_TEMPLATES = ("A: {}", "so {}", "{} ok")


def careless_response(ideal: str, rng: np.random.Generator) -> str:
    """The right answer wrapped in filler, which breaks the bare-answer format every scorer asks for."""
    return CARELESS_TEMPLATES[rng.integers(len(CARELESS_TEMPLATES))].format(ideal)


_FILLER = re.compile("^(?:" + "|".join(re.escape(t).replace(r"\{\}", ".+") for t in CARELESS_TEMPLATES) + ")$",
                     re.DOTALL)


def has_filler(response: str) -> bool:
    """Whether a response is wrapped the careless demonstrator's way (whatever it wraps)."""
    return bool(_FILLER.match(response.strip()))


def demonstrations(prompts: list[str], noise: float, seed: int) -> list[dict]:
    """SFT records: the ideal response, or with probability `noise` a careless one."""
    if not 0.0 <= noise < 1.0:
        raise ValueError(f"task.demo_noise={noise} must be in [0, 1)")
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        ideal = answer(p)
        out.append({"prompt": p, "response": careless_response(ideal, rng) if rng.random() < noise else ideal})
    return out


def _held_out(prompt: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little")
    return (h % 10_000) < fraction * 10_000


def sample_prompt(rng: np.random.Generator, families=FAMILIES, *, max_operand: int = 99,
                  list_len: tuple[int, int] = (3, 6)) -> str:
    family = families[rng.integers(len(families))]
    if family == "arith":
        a, b = (int(x) for x in rng.integers(0, max_operand + 1, size=2))
        op = "+" if rng.random() < 0.5 else "-"
        return f"What is {a}{op}{b}?\n"
    if family == "reverse":
        n = int(rng.integers(list_len[0], list_len[1] + 1))
        return "Reverse: " + " ".join(str(int(d)) for d in rng.integers(0, 10, size=n)) + "\n"
    if family == "word":
        return f"One word: opposite of {WORDS[rng.integers(len(WORDS))]}?\n"
    raise ValueError(f"unknown task family {family!r}; expected some of {FAMILIES}")


def draw_prompts(n: int, seed: int, *, held_out: bool, fraction: float, families=FAMILIES,
                 max_operand: int = 99) -> list[str]:
    """n prompts from the training side (held_out=False) or the evaluation side of the hash split.

    The word family is never split (closed vocabulary), so both sides draw from all of it."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        p = sample_prompt(rng, families, max_operand=max_operand)
        if p.startswith("One word") or _held_out(p, fraction) == held_out:
            out.append(p)
    return out


def draw_eval_prompts(n: int, seed: int, *, fraction: float, families=FAMILIES, max_operand: int = 99) -> list[str]:
    """n held-out prompts stratified by family (an equal share each), so the families' very
    different held-out rates (the word family is never split) cannot skew the evaluation set."""
    out = []
    for k, family in enumerate(families):
        rng = np.random.default_rng((seed, k))
        want = n // len(families) + (k < n % len(families))
        while want:
            p = sample_prompt(rng, (family,), max_operand=max_operand)
            if family == "word" or _held_out(p, fraction):
                out.append(p)
                want -= 1
    return out


def write_jsonl(path: str, records) -> None:
    """Atomic: a reader never sees half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def generate_task_files(task_cfg, out_dir: str) -> dict[str, str]:
    """Write sft.jsonl, rank_prompts.jsonl, ppo_prompts.jsonl and eval_prompts.jsonl to out_dir.

    Different seeds per file, so the four sets are independent draws (the three training sets may
    share prompts; none shares an arithmetic or reverse prompt with the evaluation set, which holds
    an equal share of each family)."""
    families = tuple(f.strip() for f in task_cfg.families.split(",") if f.strip())
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        raise ValueError(f"task.families={task_cfg.families!r}: expected a comma list of {', '.join(FAMILIES)}")
    kw = dict(fraction=task_cfg.eval_fraction, families=families, max_operand=task_cfg.max_operand)
    seed = task_cfg.seed
    sft = draw_prompts(task_cfg.n_sft, seed * 4 + 0, held_out=False, **kw)
    files = {
        "sft": demonstrations(sft, float(task_cfg.demo_noise), seed * 4 + 0),
        "rank_prompts": [{"prompt": p} for p in draw_prompts(task_cfg.n_rank, seed * 4 + 1, held_out=False, **kw)],
        "ppo_prompts": [{"prompt": p} for p in draw_prompts(task_cfg.n_ppo, seed * 4 + 2, held_out=False, **kw)],
        "eval_prompts": [{"prompt": p} for p in draw_eval_prompts(task_cfg.n_eval, seed * 4 + 3, **kw)],
    }
    paths = {}
    for name, records in files.items():
        paths[name] = os.path.join(out_dir, f"{name}.jsonl")
        write_jsonl(paths[name], records)
    return paths


def rank_responses(prompt: str, responses: list[str], rng: np.random.Generator) -> tuple[list[str], list[float]]:
    """Responses best first by the scorer; equal scores in random order (the labeler's coin)."""
    scores = [score(prompt, r) for r in responses]
    if any(s is None for s in scores):
        raise ValueError(f"prompt {prompt!r} is not a task prompt; the scorer cannot rank it")
    ties = rng.permutation(len(responses))
    order = sorted(range(len(responses)), key=lambda i: (-scores[i], ties[i]))
    return [responses[i] for i in order], [scores[i] for i in order]
