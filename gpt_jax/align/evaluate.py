"""Judge a policy with the task's scorer on held-out prompts, and plot PPO's curves.

The scorer is not the reward model, so its mean tells whether a stage improved the behaviour or only
its reward-model score. `evaluate` works on a pretraining, SFT or PPO workdir, or on the base model
SFT starts from (align.init_workdir, or a fresh random model when that is empty).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.metrics import read_metrics
from gpt_jax.model import GPT
from gpt_jax.optim import make_optimizer

from gpt_jax.align import common, task
from gpt_jax.align.config import optimizer_config
from gpt_jax.align.data import encode_prompt, load_prompts, strip_stop
from gpt_jax.align.models import AlignTrainer
from gpt_jax.align.rollout import generate_batched


def _stage_of(workdir: str) -> str:
    checkpointer, step, meta = common.open_existing(workdir, "--workdir")
    checkpointer.close()
    return meta.get("stage", "pretrain")


def load_policy(config, workdir: str | None):
    """(model config, params, tokenizer, what) for a workdir's policy, or for the base model."""
    mesh = common.make_mesh(config)
    if workdir is None:
        init = config.align.init_workdir
        if init:
            tok = common.tokenizer_of(init, "align.init_workdir")
            model_cfg, signature = common.model_config(config, tok)
            gpt_abstract, _ = common.abstract_states(config, model_cfg, mesh)
            state, _ = common.restore_previous(init, "align.init_workdir", ("pretrain", "sft"), signature, gpt_abstract)
            return model_cfg, state.params, tok, f"base ({init})"
        tok = common.sft_tokenizer(config, [])
        model_cfg, _ = common.model_config(config, tok)
        trainer = AlignTrainer(GPT(model_cfg), make_optimizer(optimizer_config(config.sft, 1)), mesh,
                               config.sharding_rules, None)
        return model_cfg, trainer.init_state(jax.random.key(config.seed)).params, tok, "base (random init)"
    tok = common.tokenizer_of(workdir, "--workdir")
    model_cfg, signature = common.model_config(config, tok)
    stage = _stage_of(workdir)
    gpt_abstract, head_abstract = common.abstract_states(config, model_cfg, mesh)
    if stage in ("pretrain", "sft"):
        state, _ = common.restore_previous(workdir, "--workdir", (stage,), signature, gpt_abstract)
        return model_cfg, state.params, tok, stage
    if stage == "ppo":
        states, _ = common.restore_previous(workdir, "--workdir", ("ppo",), signature,
                                            {"policy": gpt_abstract, "value": head_abstract})
        return model_cfg, states["policy"].params, tok, stage
    raise UserError(f"--workdir {workdir} holds a {stage} checkpoint, which is not a policy")


def evaluate(config, workdir: str | None) -> dict:
    e = config.eval
    texts = load_prompts(common.data_path(config, "eval_prompts"))
    model_cfg, params, tok, what = load_policy(config, workdir)
    prompts = [encode_prompt(tok, p) for p in texts]
    if max(map(len, prompts)) + e.max_new_tokens > model_cfg.block_size:
        raise UserError(f"an evaluation prompt with eval.max_new_tokens={e.max_new_tokens} exceeds model.block_size")
    outs = generate_batched(model_cfg, params, prompts, batch_size=e.batch_size, key=jax.random.key(e.seed),
                            max_new_tokens=e.max_new_tokens, temperature=e.temperature, stop_token=tok.eot_id)
    responses = [tok.decode(strip_stop(o, tok.eot_id)) for o in outs]
    scores = [task.score(p, r) for p, r in zip(texts, responses)]
    if any(s is None for s in scores):
        raise UserError("the evaluation prompts are not task prompts; the scorer cannot judge them")
    by_family = {}
    for p, s in zip(texts, scores):
        fam = "arith" if p.startswith("What is") else "reverse" if p.startswith("Reverse") else "word"
        by_family.setdefault(fam, []).append(s)
    result = {
        "model": what, "prompts": len(texts), "temperature": e.temperature,
        "scorer_mean": float(np.mean(scores)),
        "exact": float(np.mean([s == 1.0 for s in scores])),
        **{f"scorer_{k}": float(np.mean(v)) for k, v in sorted(by_family.items())},
        "stopped": float(np.mean([tok.eot_id in list(o) for o in outs])),
        "filler": float(np.mean([task.has_filler(r) for r in responses])),  # the careless demonstrator's habit
        "examples": [{"prompt": p, "response": r, "score": s} for p, r, s in list(zip(texts, responses, scores))[:8]],
    }
    return result


def plot_ppo(workdir: str, out: str) -> str:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist: run `ppo` in that workdir first")
    records = read_metrics(workdir, "ppo")
    if not records:
        raise UserError(f"{path} has no ppo records")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in records]
    panels = [("reward model score and total reward", ("score", "reward")), ("KL(pi || pi_SFT) per response", ("kl",)),
              ("KL coefficient", ("kl_coef",)), ("task scorer on rollouts", ("task_score",))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (title, keys) in zip(axes, panels):
        for k in keys:
            ys = [r.get(k, np.nan) for r in records]
            ax.plot(steps, ys, label=k)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("PPO iteration")
        if len(keys) > 1:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_json(path: str, record: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
