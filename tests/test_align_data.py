"""Alignment data: response-only SFT masking (packed and not), ranking validation, the task scorer."""

import json

import numpy as np
import pytest

from gpt_jax.align import task
from gpt_jax.align.data import load_rankings, ranking_arrays, sft_rows
from gpt_jax.errors import UserError
from gpt_jax.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
DEMOS = [("What is 2+3?\n", "5"), ("Reverse: 1 2 3\n", "3 2 1"), ("One word: opposite of up?\n", "down"),
         ("What is 9-4?\n", "5")]


def spans(tokens, mask):
    """Each maximal run of masked targets, decoded."""
    targets = tokens[1:]
    out, run = [], []
    for t, m in zip(targets, mask):
        if m:
            run.append(int(t))
        elif run:
            out.append(TOK.decode(run)), run.clear()
    if run:
        out.append(TOK.decode(run))
    return out


@pytest.mark.parametrize("pack", [False, True])
def test_sft_loss_covers_exactly_the_responses_and_their_end_of_text(pack):
    tokens, mask = sft_rows(TOK, DEMOS, block_size=96, pack=pack, seed=0)
    assert tokens.shape[1] == 97 and mask.shape[1] == 96
    assert len(tokens) == (1 if pack else 4)  # four short examples fit one packed row
    trained = sorted(s for row, m in zip(tokens, mask) for s in spans(row, m))
    assert trained == sorted(r + "<|endoftext|>" for _, r in DEMOS)
    # Every masked target lies in one of those spans, so no prompt or padding token is ever trained on.
    assert int(mask.sum()) == sum(len(TOK.encode(r)) + 1 for _, r in DEMOS)


def test_packing_never_splits_an_example_across_rows():
    demos = [(f"Reverse: {' '.join('123456')}\n", "6 5 4 3 2 1")] * 7
    tokens, mask = sft_rows(TOK, demos, block_size=64, pack=True, seed=0)
    for row, m in zip(tokens, mask):
        assert all(s == "6 5 4 3 2 1<|endoftext|>" for s in spans(row, m))
        assert TOK.decode(row).count("Reverse") == len(spans(row, m))
    assert sum(len(spans(r, m)) for r, m in zip(tokens, mask)) == 7


def test_too_long_demonstration_is_a_user_error():
    with pytest.raises(UserError, match="more than fit"):
        sft_rows(TOK, [("x" * 60, "y" * 10)], block_size=64, pack=True, seed=0)


def write(tmp_path, records):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.mark.parametrize("responses,fragment", [
    (["only one"], "at least 2 responses"),
    (["a", "b", "a"], "responses 1 and 3 are the same text"),
    (["a", None, "c"], "response 2 of 3 is missing"),
    (["a", "", "c"], "response 2 of 3 is missing"),
    ([f"r{i}" for i in range(10)], "more than reward.max_k=9"),
])
def test_bad_rankings_are_refused(tmp_path, responses, fragment):
    path = write(tmp_path, [{"prompt": "p", "responses": ["x", "y"]}, {"prompt": "q", "responses": responses}])
    with pytest.raises(UserError, match=fragment) as e:
        load_rankings(path, max_k=9)
    assert ":2:" in str(e.value) and "\n" not in str(e.value)


def test_ranking_arrays_pad_k_and_mark_valid_slots():
    rankings = [("What is 1+1?\n", ["2", "3", "x", "11"], None), ("What is 1+2?\n", ["3", "4"], None)]
    arrays = ranking_arrays(TOK, rankings, block_size=64, max_k=9)
    assert arrays["tokens"].shape == (2, 9, 64)
    assert arrays["valid"].sum(1).tolist() == [4, 2]
    seq = arrays["tokens"][0, 3, :arrays["last"][0, 3] + 1]
    assert TOK.decode(seq) == "<|endoftext|>What is 1+1?\n11<|endoftext|>"


def test_scorer_is_deterministic_and_graded():
    assert task.score("What is 12-15?\n", "-3") == 1.0
    assert task.score("What is 12-15?\n", "3") == 0.2
    assert task.score("What is 12-15?\n", "three") == 0.0
    assert task.score("Reverse: 1 2 3 4\n", "4 3 2 1") == 1.0
    assert task.score("Reverse: 1 2 3 4\n", "4 3 1 2") == 0.5
    assert task.score("Reverse: 1 2 3 4\n", "4 3 2 1 0") == 0.8
    assert task.score("One word: opposite of hot?\n", "cold") == 1.0
    assert task.score("One word: opposite of hot?\n", "warm") == 0.3
    assert task.score("One word: opposite of hot?\n", "very cold") == 0.0
    assert task.score("Tell me a story\n", "no") is None


def test_ranking_breaks_ties_at_random_and_orders_by_score():
    prompt = "What is 2+2?\n"
    seen = set()
    for seed in range(20):
        ranked, scores = task.rank_responses(prompt, ["5", "4", "x", "6"], np.random.default_rng(seed))
        assert ranked[0] == "4" and ranked[-1] == "x" and scores == [1.0, 0.2, 0.2, 0.0]
        seen.add(tuple(ranked[1:3]))
    assert seen == {("5", "6"), ("6", "5")}


def test_task_files_hold_out_evaluation_prompts(tmp_path):
    from gpt_jax.align.config import get_align_base_config

    cfg = get_align_base_config().task
    cfg.update(n_sft=400, n_rank=50, n_ppo=100, n_eval=100)
    paths = task.generate_task_files(cfg, str(tmp_path))
    read = lambda name: [json.loads(line) for line in open(paths[name])]  # noqa: E731
    sft = read("sft")
    assert all(task.score(r["prompt"], r["response"]) == 1.0 for r in sft)
    train_prompts = {r["prompt"] for name in ("sft", "rank_prompts", "ppo_prompts") for r in read(name)}
    held_out = {r["prompt"] for r in read("eval_prompts")}
    assert not {p for p in held_out & train_prompts if not p.startswith("One word")}
    families = [r["prompt"].split()[0] for r in read("eval_prompts")]
    assert sorted(families.count(f) for f in set(families)) == [33, 33, 34]  # stratified
    assert task.generate_task_files(cfg, str(tmp_path / "again"))  # deterministic: same content
    assert open(paths["sft"]).read() == open(tmp_path / "again" / "sft.jsonl").read()


def test_careless_demonstrations_wrap_the_answer_in_filler_the_scorer_rejects():
    prompts = task.draw_prompts(2000, 0, held_out=False, fraction=0.1)
    records = task.demonstrations(prompts, noise=0.3, seed=0)
    scores = np.array([task.score(r["prompt"], r["response"]) for r in records])
    careless = scores == 0.0
    assert set(np.unique(scores)) == {0.0, 1.0}
    assert abs(careless.mean() - 0.3) < 0.03
    for r in np.array(records)[careless]:
        ideal = task.answer(r["prompt"])
        assert r["response"] != ideal and ideal in r["response"]
    assert [task.has_filler(r["response"]) for r in records] == careless.tolist()  # what eval counts
    assert task.demonstrations(prompts, noise=0.0, seed=0) == [{"prompt": p, "response": task.answer(p)} for p in prompts]
    with pytest.raises(ValueError, match="demo_noise"):
        task.demonstrations(prompts, noise=1.0, seed=0)
