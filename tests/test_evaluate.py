"""Evaluation: scoring on hand-made examples whose answer is known, prompt construction, the
generated tasks' recipes, and the evaluate and sample command lines (output and bad input)."""

import json
import os
import re

import jax
import numpy as np
import pytest

from conftest import REPO, assert_one_line_error, run_cli, tiny_config
from gpt_jax import tasks
from gpt_jax.errors import UserError
from gpt_jax.evaluate import (build_prompt, choose_shots, evaluate_task, extract_answer, score_completion,
                              score_multiple_choice)
from gpt_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


class TableLM:
    """A fake model over bytes whose next-token log-probabilities are a fixed table: p(next | current)
    is given for a few pairs and spread evenly over the rest of each row."""

    block_size = 256

    def __init__(self, probs: dict[tuple[str, str], float]):
        V = TOK.vocab_size
        table = np.zeros((V, V))
        for (cur, nxt), p in probs.items():
            table[ord(cur), ord(nxt)] = p
        for row in table:
            free = row == 0
            row[free] = (1 - row.sum()) / free.sum()
        self.logp = np.log(table)

    def token_logprobs(self, seqs):
        return [self.logp[np.array(s[:-1]), np.array(s[1:])] for s in seqs]


def mc_task(examples):
    return tasks.Task("hand", "mc", examples)


def test_multiple_choice_normalizes_per_token():
    # After "b": "c" is likely, then "d", "e", ... each likely; "z" is unlikely after anything.
    lm = TableLM({("b", "c"): 0.9, ("c", "d"): 0.9, ("d", "e"): 0.9, ("e", "f"): 0.9, ("f", "g"): 0.9,
                  ("g", "h"): 0.9})
    # "cdefgz": five likely tokens and one unlikely one; "cz": one of each. The raw sum prefers "cz";
    # the per-token mean prefers "cdefgz", the gold answer.
    task = mc_task([{"context": "ab", "choices": ["cz", "cdefgz"], "gold": 1}])
    sums = [float(np.sum(lp[-n:])) for lp, n in zip(
        lm.token_logprobs([[256, 97, 98, *map(ord, c)] for c in ("cz", "cdefgz")]), (2, 6))]
    assert sums[0] > sums[1]  # the raw sum would get it wrong
    r = score_multiple_choice(lm, TOK, task, 0, seed=0)
    assert (r["metric"], r["value"], r["n"]) == ("acc", 1.0, 1)


def test_unconditional_normalization_divides_by_the_answer_prior():
    # After the context "b": x is likelier than y. After "Answer:" (ends in ":"), x is almost as
    # likely and y very unlikely: relative to its prior, y is the better answer.
    lm = TableLM({("b", "x"): 0.5, ("b", "y"): 0.3, (":", "x"): 0.45, (":", "y"): 0.01})
    task = mc_task([{"context": "ab", "choices": ["x", "y"], "gold": 1}])
    assert score_multiple_choice(lm, TOK, task, 0, seed=0, norm="token")["value"] == 0.0
    r = score_multiple_choice(lm, TOK, task, 0, seed=0, norm="unconditional")
    assert (r["metric"], r["value"]) == ("acc_uncond", 1.0)


class AddingLM:
    """A fake greedy decoder that answers "Q: What is a plus b? A:" with a + b, but only when the
    prompt holds at least one solved example (it has "learned in context")."""

    block_size = 256

    def greedy(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            text = TOK.decode([t for t in p if t != TOK.eot_id])
            a, b = map(int, re.findall(r"What is (\d+) plus (\d+)\? A:$", text)[0])
            answer = a + b if text.count("A:") > 1 else a - b
            out.append(TOK.encode(f" {answer}\nQ: What")[:max_new_tokens].tolist())
        return out


def test_completion_is_exact_match_after_the_first_line():
    task = tasks.arithmetic_task("add2", n=10, pool_size=20, seed=0)
    zero = score_completion(AddingLM(), TOK, task, 0, seed=0)
    few = score_completion(AddingLM(), TOK, task, 2, seed=0)
    assert few["value"] == 1.0 and few["n"] == 10
    # Zero-shot it answers a - b: right only when b == 0.
    want = np.mean([int(e["answer"].strip()) == int(e["context"].split()[3]) for e in task.examples])
    assert zero["value"] == pytest.approx(want)
    assert extract_answer(" 124\nQ: What is", "\n") == "124"
    assert extract_answer(" casino \n\nPlease", "\n\n") == "casino"


class ShoutingLM:
    """Answers every scrambled word right, in capitals unless the prompt holds a solved example."""

    block_size = 256

    def greedy(self, prompts, max_new_tokens):
        out = []
        for p in prompts:
            text = TOK.decode([t for t in p if t != TOK.eot_id])
            word = re.findall(r"(\S+) =$", text)[0][::-1]
            out.append(TOK.encode(f" {word if text.count('=') > 1 else word.upper()}\n")[:max_new_tokens].tolist())
        return out


def test_completion_reports_exact_match_with_and_without_case():
    words = [f"{a}{b}word" for a in "abcdefgh" for b in "ijklmnop"]
    task = tasks.scramble_task("reversed_words", n=10, pool_size=10, seed=0, words=words)
    zero = evaluate_task(ShoutingLM(), TOK, task, [0], seed=0)
    few = evaluate_task(ShoutingLM(), TOK, task, [1], seed=0)
    assert [(r["metric"], r["value"]) for r in zero] == [("acc", 0.0), ("acc_nocase", 1.0)]
    assert [(r["metric"], r["value"]) for r in few] == [("acc", 1.0), ("acc_nocase", 1.0)]
    numbers = tasks.arithmetic_task("add2", n=5, pool_size=5, seed=0)  # no case to ignore: no second row
    assert [r["metric"] for r in evaluate_task(AddingLM(), TOK, numbers, [0, 1], seed=0)] == ["acc", "acc"]


def test_prompts_follow_the_stated_conventions():
    task = tasks.Task("t", "completion", [{"context": "Q: 1?", "answer": " one"}],
                      pool=[{"context": f"Q: {i}?", "answer": f" {i}"} for i in range(2, 9)],
                      description="Answer the question.", separator="\n\n")
    shots = choose_shots(task, 2, index=0, seed=0)
    assert shots == choose_shots(task, 2, index=0, seed=0)  # fixed seed: the same shots every run
    assert len({s["context"] for s in shots}) == 2 and all(s in task.pool for s in shots)
    prompt = build_prompt(task, task.examples[0], shots)
    assert prompt == ("Answer the question.\n" + f"{shots[0]['context']}{shots[0]['answer']}\n\n"
                      f"{shots[1]['context']}{shots[1]['answer']}\n\nQ: 1?")
    assert build_prompt(task, task.examples[0], []) == "Answer the question.\nQ: 1?"
    with pytest.raises(UserError, match="8 shots asked for but its few-shot pool has 7"):
        choose_shots(task, 8, index=0, seed=0)


def test_arithmetic_recipe_and_held_out_split():
    for name, (op, digits) in tasks.ARITHMETIC.items():
        task = tasks.arithmetic_task(name, n=50, pool_size=50, seed=1)
        for e in task.examples + task.pool:
            a, word, b = re.fullmatch(r"Q: What is (\d+) (\w+) (\d+)\? A:", e["context"]).groups()
            assert word == op and int(a) < 10 ** digits and int(b) < 10 ** digits
            assert int(e["answer"]) == tasks.ARITH_OPS[op](int(a), int(b)) and e["answer"][0] == " "
        held = {e["context"] for e in task.examples}
        assert held.isdisjoint(e["context"] for e in task.pool)
    # The training text never contains an evaluated (held-out) problem.
    for doc in tasks.arithmetic_documents(n_docs=50, seed=3):
        for a, op, b, c in re.findall(r"Q: What is (\d+) (\w+) (\d+)\? A: (-?\d+)\n", doc):
            assert not tasks._held_out(op, int(a), int(b)) and int(c) == tasks.ARITH_OPS[op](int(a), int(b))


def test_word_scrambling_recipes():
    rng = np.random.default_rng(0)
    word = "inevitably"
    cl = tasks.scramble("cycle_letters", word, rng)
    assert cl != word and cl in word + word and len(cl) == len(word)
    a1 = tasks.scramble("anagrams1", word, rng)
    assert a1[0] + a1[-1] == "iy" and sorted(a1) == sorted(word) and a1 != word
    a2 = tasks.scramble("anagrams2", word, rng)
    assert a2[:2] + a2[-2:] == "inly" and sorted(a2) == sorted(word)
    ri = tasks.scramble("random_insertion", word, rng)
    assert ri[::2] == word and all(c in tasks._INSERT_CHARS for c in ri[1::2])
    assert tasks.scramble("reversed_words", word, rng) == "ylbativeni"
    words = ["alpha", "bravo", "charlie", "delta", "echoes", "foxtrot", "golfing", "hotel", "india", "juliet"] * 3
    task = tasks.scramble_task("reversed_words", n=50, pool_size=50, seed=0, words=[w + s for w in words for s in "ab"])
    assert task.description == tasks.SCRAMBLE_DESCRIPTION
    assert {e["answer"] for e in task.examples}.isdisjoint(e["answer"] for e in task.pool)
    for e in task.examples:
        assert e["context"] == e["answer"].strip()[::-1] + " ="


def test_scramble_documents_are_prompt_shaped_and_never_hold_an_evaluated_word():
    words = [f"{a}{b}{c}word" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    mix = tasks.WORD_TASK_MIX
    docs = tasks.scramble_documents(n_docs=300, seed=5, words=words)
    evaluated = {e["answer"].strip() for name in tasks.WORD_TASK_MIX
                 for e in tasks.scramble_task(name, n=200, pool_size=10, seed=0, words=words).examples}
    assert evaluated and all(tasks._held_out_word(w) for w in evaluated)
    seen_kinds = set()
    for doc in docs:
        head, body = doc.split("\n", 1)
        assert head == tasks.SCRAMBLE_DESCRIPTION and body.endswith("\n")  # the evaluator's K-shot layout
        lines = body[:-1].split("\n")
        assert 1 <= len(lines) <= 8
        pairs = [line.rsplit(" = ", 1) for line in lines]
        for scrambled, word in pairs:
            assert word in words and word not in evaluated and not tasks._held_out_word(word)
        kinds = {k for k in mix if all(
            (k == "reversed_words" and s == w[::-1]) or (k == "random_insertion" and s[::2] == w)
            or (k == "cycle_letters" and s in w + w and len(s) == len(w)) for s, w in pairs)}
        assert kinds  # one transform per block
        seen_kinds |= kinds
    assert seen_kinds == set(mix)


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"description": "d"}\n{"context": "a", "answer": " b"}\n{"context": "a", "answer": \n')
    with pytest.raises(UserError, match=r"t.jsonl line 3: not valid JSON"):
        tasks.load_task(str(path))
    path.write_text('{"context": "a", "choices": ["x", "y"], "gold": 2}\n')
    with pytest.raises(UserError, match=r"line 1: \"gold\" must be"):
        tasks.load_task(str(path))
    with pytest.raises(UserError, match="unknown task 'nope'"):
        tasks.load_task("nope")


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A workdir as gpt_jax.train leaves it (config, tokenizer, checkpoint), with random weights."""
    from gpt_jax import checkpoint as ckpt_lib
    from gpt_jax import sharding as shd
    from gpt_jax.model import GPT, GPTConfig
    from gpt_jax.optim import make_optimizer
    from gpt_jax.tokenizer import save_tokenizer
    from gpt_jax.train_step import Trainer

    root = tmp_path_factory.mktemp("eval")
    text = root / "text.txt"
    with open(os.path.join(REPO, "gpt_jax", "model.py")) as f:
        text.write_text(f.read() * 2)
    config = tiny_config(data=dict(path=str(text)))
    wd = str(root / "run")
    os.makedirs(wd)
    ckpt_lib.write_config(wd, config)
    save_tokenizer(TOK, wd)
    trainer = Trainer(GPT(GPTConfig.from_config(config, TOK.vocab_size)), make_optimizer(config.train),
                      shd.make_mesh(config.mesh), config.sharding_rules)
    ckpt = ckpt_lib.Checkpointer(wd)
    ckpt.save(0, trainer.init_state(jax.random.key(0)), {"data": {"next_step": 0}})
    ckpt.wait()
    ckpt.close()
    return wd


def test_evaluate_cli_prints_a_table_and_writes_json(workdir, tmp_path):
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"description": "Pick one."}\n'
                  '{"context": "def", "choices": [" f(x):", " 123"], "gold": 0}\n'
                  '{"context": "import", "choices": [" os", " !!"], "gold": 0}\n'
                  '{"context": "class", "choices": [" A:", " ++"], "gold": 0, "split": "train"}\n')
    out = tmp_path / "res.json"
    proc = run_cli("gpt_jax.evaluate", "--workdir", workdir, "--task", f"add2,{mc},val", "--shots", "0,1",
                   "--n", "4", "--val-tokens", "2000", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines()[0].split() == ["task", "shots", "metric", "value", "n"]
    rows = json.loads(out.read_text())["results"]
    got = {(r["task"], r["shots"], r["metric"]): r for r in rows}
    assert {("add2", 0, "acc"), ("add2", 1, "acc"), ("mc", 0, "acc"), ("mc", 1, "acc")} <= set(got)
    assert got[("add2", 1, "acc")]["n"] == 4 and got[("mc", 0, "acc")]["n"] == 2
    val = [r for r in rows if r["task"].startswith("val/")]
    ppl = next(r["value"] for r in val if r["metric"] == "ppl")
    bpb = next(r["value"] for r in val if r["metric"] == "bpb")
    # Random weights: close to uniform over the (padded) vocabulary; bytes = tokens, so bpb = log2(ppl).
    assert 200 < ppl < 450
    assert bpb == pytest.approx(np.log2(ppl), rel=1e-6)


@pytest.mark.parametrize("args,fragments", [
    (["--task", "nope"], ["unknown task 'nope'"]),
    (["--task", "BAD", "--shots", "0"], ["line 2", "not valid JSON"]),
    (["--task", "POOL", "--shots", "0,2"], ["2 shots asked for", "pool has 1"]),
], ids=["unknown-task", "malformed-jsonl", "k-over-pool"])
def test_evaluate_cli_bad_input(workdir, tmp_path, args, fragments):
    (tmp_path / "bad.jsonl").write_text('{"context": "a", "answer": " b"}\n{"context": oops}\n')
    (tmp_path / "pool.jsonl").write_text('{"context": "a", "answer": " b"}\n'
                                         '{"context": "c", "answer": " d", "split": "train"}\n')
    args = [{"BAD": str(tmp_path / "bad.jsonl"), "POOL": str(tmp_path / "pool.jsonl")}.get(a, a) for a in args]
    assert_one_line_error(run_cli("gpt_jax.evaluate", "--workdir", workdir, *args), *fragments)


def test_cli_refuses_a_workdir_without_checkpoint(workdir, tmp_path):
    empty = tmp_path / "nockpt"
    os.makedirs(empty)
    for name in ("config.json", "tokenizer.json"):
        with open(os.path.join(workdir, name)) as src:
            (empty / name).write_text(src.read())
    assert_one_line_error(run_cli("gpt_jax.evaluate", "--workdir", str(empty), "--task", "add2", "--shots", "0"),
                          "no checkpoint")


def test_sample_cli_hyphenated_flags_and_several_samples(workdir):
    proc = run_cli("gpt_jax.sample", "--workdir", workdir, "--prompt", "def ", "--max-new-tokens", "10",
                   "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95", "--num-samples", "2", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("--- sample") == 2 and proc.stdout.count("\ndef ") == 2


@pytest.mark.parametrize("args,fragments", [
    (["--prompt", "x" * 70], ["70 tokens", "longer than the model's context of 64"]),
    (["--prompt", "x" * 60, "--max-new-tokens", "10"], ["exceeds", "at most 4 new tokens"]),
    (["--prompt", ""], ["--prompt is empty"]),
], ids=["prompt-too-long", "no-room", "empty-prompt"])
def test_sample_cli_bad_input(workdir, args, fragments):
    assert_one_line_error(run_cli("gpt_jax.sample", "--workdir", workdir, *args), *fragments)


def test_puzzle_blocks_write_every_answer_in_one_style_and_use_both_styles():
    words = [f"{a}{b}{c}word" for a in "abcdefgh" for b in "ijklmnop" for c in "qrstuvwx"]
    docs = tasks.scramble_documents(n_docs=200, seed=5, words=words, answer_styles=tasks.PUZZLE_ANSWER_STYLES)
    styles = []
    for doc in docs:
        answers = [line.rsplit(" = ", 1)[1] for line in doc.split("\n")[1:-1]]
        assert all(a.lower() in words for a in answers)
        kinds = {"capitalized" if a[0].isupper() else "lower" for a in answers}
        assert len(kinds) == 1 and all(a[1:].islower() for a in answers)
        styles.append(kinds.pop())
    assert 0.35 < styles.count("lower") / len(styles) < 0.65
    # The default (the `wordtasks` source) is the lowercase-only stream.
    assert tasks.scramble_documents(n_docs=50, seed=5, words=words) == \
        tasks.scramble_documents(n_docs=50, seed=5, words=words, answer_styles=("lower",))
    with pytest.raises(ValueError, match="answer_styles"):
        tasks.scramble_documents(n_docs=1, words=words, answer_styles=("upper",))
