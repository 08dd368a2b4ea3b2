"""Zero-, one- and few-shot evaluation of a trained workdir, scored as in GPT-3 §2.4.

    python -m gpt_jax.evaluate --workdir runs/arith --task add2,sub2,mul2,val --shots 0,1,4 \
        [--n 200] [--seed 0] [--mc-norm token|unconditional] [--pool FILE.jsonl] [--out FILE.json]

Tasks: a name from gpt_jax.tasks (add2 sub2 add3 sub3 mul2 cycle_letters anagrams1 anagrams2
random_insertion reversed_words), a JSONL file (format and prompt conventions in gpt_jax/tasks.py), or
`val`: perplexity and bits per byte on the held-out split of the training data.

- Multiple choice: each choice's log-likelihood after the prompt, divided by its number of tokens;
  with --mc-norm unconditional, minus the choice's log-likelihood after EOT + "Answer:" instead
  (GPT-3's normalization for tasks whose choices differ in prior likelihood). Accuracy.
- Completion: greedy decoding (cached, gpt_jax.generate) for as many tokens as the longest answer
  plus 2, cut at the first newline or separator, compared to the answer after stripping spaces:
  exact-match accuracy.
- K-shot: K examples drawn from the task's pool (never from the evaluated examples) without
  replacement, by a generator seeded with (seed, example index): the same prompts on every run.
  Prompts longer than the context lose their oldest tokens (counted in the output as "truncated").

Prints a table (task, shots, metric, value, n) and writes it as JSON (default WORKDIR/eval.json).
"""

from __future__ import annotations

import json
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.tasks import Task, load_task

UNCONDITIONAL_CONTEXT = "Answer:"


# ----------------------------------------------------------------------------- the model interface


class LM:
    """A trained model seen as two functions: the evaluator needs nothing else (tests use fakes)."""

    def __init__(self, model_cfg, params, tokenizer, batch_size: int = 16):
        self.cfg, self.params, self.tokenizer, self.batch_size = model_cfg, params, tokenizer, batch_size
        self.block_size = model_cfg.block_size
        from gpt_jax.model import GPT

        model = GPT(model_cfg)

        @jax.jit
        def logprobs(params, tokens):
            logits = model.apply({"params": params}, tokens).astype(jnp.float32)
            lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
            return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]

        self._logprobs = logprobs

    def token_logprobs(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """For each sequence, log p(seq[i] | seq[:i]) for i = 1..len-1 (sequences longer than the
        context keep their last block_size tokens, so the array covers only those)."""
        from gpt_jax.generate import pad_prompts

        out: list[np.ndarray | None] = [None] * len(seqs)
        seqs = [s[-self.block_size:] for s in seqs]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = [seqs[i] for i in idx]
            batch += [batch[-1]] * (self.batch_size - len(batch))  # one batch shape per length bucket
            tokens, lengths = pad_prompts(self.cfg, batch)
            lp = np.asarray(self._logprobs(self.params, jnp.asarray(tokens)))
            for row, i in enumerate(idx):
                out[i] = lp[row, :lengths[row] - 1]
        return out  # type: ignore[return-value]

    def greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuations (cached decoding); prompts are cut to leave room for the new tokens."""
        from gpt_jax.generate import generate

        room = self.block_size - max_new_tokens
        prompts = [p[-room:] for p in prompts]
        out = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            res = generate(self.cfg, self.params, chunk, max_new_tokens=max_new_tokens, key=jax.random.key(0),
                           temperature=0.0, stop_token=self.tokenizer.eot_id)
            out += [res.tokens[i, :res.lengths[i]].tolist() for i in range(len(chunk))]
        return out


# ----------------------------------------------------------------------------- prompts and scoring


def choose_shots(task: Task, k: int, index: int, seed: int) -> list[dict]:
    if k > len(task.pool):
        raise UserError(f"task {task.name}: {k} shots asked for but its few-shot pool has {len(task.pool)} "
                        f"example(s)")
    if k == 0:
        return []
    rng = np.random.default_rng((seed, index))
    return [task.pool[i] for i in rng.choice(len(task.pool), size=k, replace=False).tolist()]


def _target(example: dict) -> str:
    return example["choices"][example["gold"]] if "choices" in example else example["answer"]


def build_prompt(task: Task, example: dict, shots: list[dict]) -> str:
    """description line, then K solved examples, then the context (conventions in gpt_jax/tasks.py)."""
    head = task.description + "\n" if task.description else ""
    return head + "".join(s["context"] + _target(s) + task.separator for s in shots) + example["context"]


def _encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer.encode(text)]


def score_multiple_choice(lm, tokenizer, task: Task, k: int, seed: int, norm: str = "token") -> dict:
    eot = [tokenizer.eot_id]
    seqs, spans, owners = [], [], []
    uncond = eot + _encode(tokenizer, UNCONDITIONAL_CONTEXT)
    truncated = set()
    for i, ex in enumerate(task.examples):
        prompt = eot + _encode(tokenizer, build_prompt(task, ex, choose_shots(task, k, i, seed)))
        for c, choice in enumerate(ex["choices"]):
            ids = _encode(tokenizer, choice)
            if len(prompt) + len(ids) > lm.block_size:
                truncated.add(i)
            seqs.append(prompt + ids), spans.append(len(ids)), owners.append((i, c, "cond"))
            if norm == "unconditional":
                seqs.append(uncond + ids), spans.append(len(ids)), owners.append((i, c, "uncond"))
    lps = lm.token_logprobs(seqs)
    scores = [np.zeros(len(ex["choices"])) for ex in task.examples]
    for lp, n, (i, c, which) in zip(lps, spans, owners):
        total = float(np.sum(lp[-n:]))
        if norm == "token":
            scores[i][c] = total / n
        else:
            scores[i][c] += total if which == "cond" else -total
    correct = [int(np.argmax(s) == ex["gold"]) for s, ex in zip(scores, task.examples)]
    return {"metric": "acc" if norm == "token" else "acc_uncond", "value": float(np.mean(correct)),
            "n": len(correct), "truncated": len(truncated)}


def extract_answer(text: str, separator: str) -> str:
    """The generated text up to the first newline or separator, without surrounding spaces."""
    for stop in ("\n", separator.strip() or "\n"):
        text = text.split(stop, 1)[0]
    return text.strip()


def score_completion(lm, tokenizer, task: Task, k: int, seed: int, *, samples: int = 0) -> dict:
    eot = [tokenizer.eot_id]
    prompts = [eot + _encode(tokenizer, build_prompt(task, ex, choose_shots(task, k, i, seed)))
               for i, ex in enumerate(task.examples)]
    max_new = max(len(_encode(tokenizer, ex["answer"])) for ex in task.examples) + 2
    truncated = sum(len(p) + max_new > lm.block_size for p in prompts)
    outs = lm.greedy(prompts, max_new)
    got = [extract_answer(tokenizer.decode([t for t in o if t != tokenizer.eot_id]), task.separator) for o in outs]
    correct = [int(g == ex["answer"].strip()) for g, ex in zip(got, task.examples)]
    # Also without case: tells a model that knows the answer but writes it in the wrong case (a
    # format the examples of a few-shot prompt show) from one that does not know it.
    nocase = [int(g.casefold() == ex["answer"].strip().casefold()) for g, ex in zip(got, task.examples)]
    result = {"metric": "acc", "value": float(np.mean(correct)), "n": len(correct), "truncated": truncated,
              "acc_nocase": float(np.mean(nocase))}
    if samples:
        result["samples"] = [{"context": ex["context"], "answer": ex["answer"].strip(), "got": g}
                             for ex, g in zip(task.examples[:samples], got)]
    return result


def evaluate_task(lm, tokenizer, task: Task, shots: list[int], seed: int, norm: str = "token") -> list[dict]:
    for k in shots:  # every K checked before any work
        choose_shots(task, k, 0, seed)
    cased = task.kind == "completion" and any(ex["answer"].upper() != ex["answer"].lower() for ex in task.examples)
    rows = []
    for k in shots:
        if task.kind == "mc":
            rows.append({"task": task.name, "shots": k, **score_multiple_choice(lm, tokenizer, task, k, seed, norm)})
            continue
        r = score_completion(lm, tokenizer, task, k, seed, samples=3)
        nocase = r.pop("acc_nocase")
        rows.append({"task": task.name, "shots": k, **r})
        if cased:  # answers with letters: also the match that ignores case
            rows.append({"task": task.name, "shots": k, "metric": "acc_nocase", "value": nocase, "n": r["n"]})
    return rows


# ----------------------------------------------------------------------------- perplexity


def val_rows(lm, dataset, max_tokens: int) -> list[dict]:
    """Perplexity and bits per byte over consecutive windows of each source's val split.

    Bytes are the UTF-8 bytes of the decoded targets, an end-of-text token counting as one byte."""
    tok, L = dataset.tokenizer, lm.block_size
    rows = []
    for source in dataset.sources:
        val = np.asarray(source.val)
        n_windows = max(1, min((len(val) - 1) // L, max(1, max_tokens // L)))
        if len(val) < 2:
            raise UserError(f"data source {source.name} has no val split to evaluate")
        seqs = [val[i * L:i * L + L + 1].astype(np.int64).tolist() for i in range(n_windows)]
        nats = sum(-float(np.sum(lp)) for lp in lm.token_logprobs(seqs))
        targets = np.concatenate([np.asarray(s[1:]) for s in seqs])
        n_eot = int(np.sum(targets == tok.eot_id))
        n_bytes = len(tok.decode(targets[targets != tok.eot_id]).encode("utf-8")) + n_eot
        name = f"val/{source.name}"
        rows += [{"task": name, "shots": 0, "metric": "ppl", "value": math.exp(nats / len(targets)),
                  "n": len(targets)},
                 {"task": name, "shots": 0, "metric": "bpb", "value": nats / math.log(2) / n_bytes,
                  "n": n_bytes}]
    return rows


# ----------------------------------------------------------------------------- CLI


def format_table(rows: list[dict]) -> str:
    width = max([4] + [len(r["task"]) for r in rows])
    lines = [f"{'task':<{width}}  {'shots':>5}  {'metric':<10}  {'value':>8}  {'n':>7}"]
    for r in rows:
        lines.append(f"{r['task']:<{width}}  {r['shots']:>5}  {r['metric']:<10}  {r['value']:>8.4f}  {r['n']:>7}")
    return "\n".join(lines)


def parse_shots(text: str) -> list[int]:
    try:
        shots = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--shots must be a comma-separated list of integers, got {text!r}") from None
    if not shots or any(k < 0 for k in shots):
        raise UserError(f"--shots must list K >= 0, got {text!r}")
    return shots


def _define_flags(fv):
    flags.DEFINE_string("workdir", None, "a training workdir", flag_values=fv)
    flags.DEFINE_string("task", None, "comma-separated task names, .jsonl files, or val", flag_values=fv)
    flags.DEFINE_string("shots", "0,1,4", "comma-separated K values", flag_values=fv)
    flags.DEFINE_integer("n", 200, "examples per task (0: all of a JSONL file)", flag_values=fv)
    flags.DEFINE_integer("pool_size", 200, "few-shot pool size of generated tasks", flag_values=fv)
    flags.DEFINE_string("pool", None, "a JSONL file of few-shot examples for a JSONL task", flag_values=fv)
    flags.DEFINE_integer("seed", 0, "seed for generated tasks and the choice of shots", flag_values=fv)
    flags.DEFINE_enum("mc_norm", "token", ["token", "unconditional"], "multiple-choice normalization",
                      flag_values=fv)
    flags.DEFINE_integer("val_tokens", 65536, "tokens per source for val perplexity", flag_values=fv)
    flags.DEFINE_integer("batch_size", 16, "sequences per forward pass", flag_values=fv)
    flags.DEFINE_string("out", None, "JSON output (default WORKDIR/eval.json)", flag_values=fv)


@cli_entry
def main(argv):
    from gpt_jax.sample import load_for_sampling

    fv = cli.parse(argv, "gpt_jax.evaluate", _define_flags, need_config=False)
    if not fv.workdir:
        raise UserError("--workdir is required")
    if not fv.task:
        raise UserError("--task is required (a task name, a .jsonl file, or val)")
    shots = parse_shots(fv.shots)
    names = [t.strip() for t in fv.task.split(",") if t.strip()]
    tasks = [None if name == "val" else load_task(name, n=fv.n, pool_size=fv.pool_size, seed=fv.seed,
                                                  pool_path=fv.pool) for name in names]
    for task in tasks:  # bad K before loading anything heavy
        if task is not None:
            for k in shots:
                choose_shots(task, k, 0, fv.seed)
    trainer, params, tokenizer = load_for_sampling(fv.workdir)
    lm = LM(trainer.model.cfg, params, tokenizer, batch_size=fv.batch_size)
    rows: list[dict] = []
    for name, task in zip(names, tasks):
        if task is None:
            from gpt_jax import checkpoint as ckpt_lib
            from gpt_jax.data import build_dataset

            config = ckpt_lib.read_config(fv.workdir)
            rows += val_rows(lm, build_dataset(config.data, fv.workdir, config.seed), fv.val_tokens)
        else:
            rows += evaluate_task(lm, tokenizer, task, shots, fv.seed, fv.mc_norm)
    print(format_table(rows))
    out = fv.out or os.path.join(fv.workdir, "eval.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"workdir": fv.workdir, "shots": shots, "seed": fv.seed, "mc_norm": fv.mc_norm, "results": rows},
                  f, indent=2)
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
