"""What the three stages share: paths from the config, the tokenizer, loading a previous stage's
checkpoint (refusing one of another model or stage), and opening a stage's own workdir.

A stage checks every input (data files, previous checkpoints, its own workdir's checkpoint) before
it writes anything, so bad input leaves every workdir exactly as it was.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import sharding as shd
from gpt_jax.errors import UserError
from gpt_jax.model import GPT, GPTConfig
from gpt_jax.optim import make_optimizer
from gpt_jax.tokenizer import Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer
from gpt_jax.train import build_model
from gpt_jax.train_step import Trainer

from gpt_jax.align.config import optimizer_config
from gpt_jax.align.models import ScalarHeadGPT

DATA_FILES = {"sft_data": "sft.jsonl", "rank_prompts": "rank_prompts.jsonl", "rank_data": "rankings.jsonl", "ppo_prompts": "ppo_prompts.jsonl",
              "eval_prompts": "eval_prompts.jsonl"}


def data_path(config, key: str) -> str:
    """config.align.<key>, or the task file of that name in align.data_dir when it is empty."""
    return config.align[key] or os.path.join(config.align.data_dir, DATA_FILES[key])


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, flush=True)


def signature_diffs(saved: dict | None, current: dict) -> list[str]:
    """As checkpoint.signature_diffs, worded for comparing against another stage's checkpoint."""
    return ckpt_lib.signature_diffs(saved, current, arrow="vs")


def tokenizer_of(workdir: str, key: str) -> Tokenizer:
    tok = load_tokenizer(workdir) if workdir and os.path.isdir(workdir) else None
    if tok is None:
        raise UserError(f"{key}={workdir or '(empty)'} has no tokenizer.json: it is not a finished "
                        f"{'SFT' if 'sft' in key else 'training'} workdir (run that stage first)")
    return tok


def sft_tokenizer(config, texts: list[str]) -> Tokenizer:
    """SFT keeps the pretrained model's tokenizer; a fresh model gets config.data.tokenizer."""
    if config.align.init_workdir:
        return tokenizer_of(config.align.init_workdir, "align.init_workdir")
    return build_tokenizer(config.data.tokenizer, texts, config.data.bpe_vocab_size)


def model_config(config, tok: Tokenizer) -> tuple[GPTConfig, dict]:
    model_cfg = build_model(config, tok.vocab_size)
    return model_cfg, ckpt_lib.model_signature(config, model_cfg.vocab_size)


def abstract_states(config, model_cfg: GPTConfig, mesh):
    """The sharded abstract train states of a plain GPT and of a scalar-head GPT. The optimizer's
    state structure does not depend on its hyperparameters, so these restore any stage's checkpoint."""
    tx = make_optimizer(optimizer_config(config.sft, 1))
    gpt = Trainer(GPT(model_cfg), tx, mesh, config.sharding_rules).abstract_state
    head = Trainer(ScalarHeadGPT(model_cfg), tx, mesh, config.sharding_rules).abstract_state
    return gpt, head


def open_existing(path: str, key: str) -> tuple[ckpt_lib.Checkpointer, int, dict]:
    if not path:
        raise UserError(f"{key} is empty: name the workdir of the stage it should read")
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise UserError(f"{key}={path} has no checkpoints/ directory: that stage has not been run there")
    checkpointer = ckpt_lib.Checkpointer(path)
    step = checkpointer.latest_step()
    if step is None:
        checkpointer.close()
        raise UserError(f"{key}={path} holds no finished checkpoint")
    return checkpointer, step, checkpointer.restore_meta(step)


def restore_previous(path: str, key: str, stages: tuple[str, ...], signature: dict, abstract_state):
    """The train state of the last checkpoint in another stage's workdir, after checking that it
    is a checkpoint of one of `stages` ("pretrain" = gpt_jax.train) and of this very model."""
    checkpointer, step, meta = open_existing(path, key)
    try:
        stage = meta.get("stage", "pretrain")
        if stage not in stages:
            raise UserError(f"{key}={path} holds a {stage} checkpoint, but a {' or '.join(stages)} "
                            "checkpoint is needed there")
        diffs = signature_diffs(meta.get("model_signature"), signature)
        if diffs:
            raise UserError(f"{key}={path} was made for a different model ({'; '.join(diffs)}, checkpoint vs "
                            "config); use the model config it was trained with")
        return checkpointer.restore_state(step, abstract_state), meta
    finally:
        checkpointer.close()


@dataclasses.dataclass
class StageResult:
    step: int
    interrupted: bool
    workdir: str
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class StageDir:
    """A stage's own workdir after its checks: the latest checkpoint (if any) is of this stage and
    this model. Nothing has been written yet; `create()` writes the config and tokenizer."""
    workdir: str
    stage: str
    signature: dict
    latest: int | None
    meta: dict | None
    keep: int

    def create(self, config, tok: Tokenizer) -> ckpt_lib.Checkpointer:
        os.makedirs(self.workdir, exist_ok=True)
        if self.latest is None and jax.process_index() == 0:
            ckpt_lib.write_config(self.workdir, config)
            save_tokenizer(tok, self.workdir)
        return ckpt_lib.Checkpointer(self.workdir, keep=self.keep)

    def resume(self, config, tok: Tokenizer, abstract_state, unit: str = "step"):
        """(checkpointer, state restored from the latest checkpoint); only when `latest` is set."""
        assert self.latest is not None, "resume() needs a checkpoint; check StageDir.latest first"
        checkpointer = self.create(config, tok)
        state = checkpointer.restore_state(self.latest, abstract_state)
        log(f"resumed from {unit} {self.latest} in {checkpointer.directory}")
        return checkpointer, state


def check_stage_dir(workdir: str, stage: str, signature: dict, keep: int) -> StageDir:
    latest = meta = None
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
        checkpointer = ckpt_lib.Checkpointer(workdir)
        try:
            latest = checkpointer.latest_step()
            meta = checkpointer.restore_meta(latest) if latest is not None else None
        finally:
            checkpointer.close()
    if meta is not None:
        if meta.get("stage", "pretrain") != stage:
            raise UserError(f"workdir {workdir} holds a {meta.get('stage', 'pretrain')} checkpoint; "
                            f"use another --workdir for {stage}")
        diffs = signature_diffs(meta.get("model_signature"), signature)
        if diffs:
            raise UserError(f"workdir {workdir} holds a checkpoint of a different model ({'; '.join(diffs)}, "
                            "checkpoint vs config); use another --workdir or the original config")
    return StageDir(workdir, stage, signature, latest, meta, keep)


def make_mesh(config):
    return shd.make_mesh(config.mesh)


def run_steps(*, name: str, trainer, state, start: int, steps: int, batch_at, writer, log_every: int,
              ckpt_every: int, save, seed: int = 0, stop_at_step: int | None = None, every=None):
    """The step loop of SFT and reward training (gpt_jax.train's, minus what they do not need):
    one console line per log step, metrics to JSONL/TensorBoard, periodic checkpoints, and
    Ctrl-C/SIGTERM (or stop_at_step) saving and stopping at the next step boundary.

    `every(step, state)` runs after each step (evaluation). Returns (state, step, interrupted)."""
    import signal
    import time

    from gpt_jax.train import StopSignal

    key = jax.random.key(seed + 1)  # dropout
    step, interrupted, t0 = start, False, time.perf_counter()
    with StopSignal() as stop:
        while step < steps:
            state, metrics = trainer.train_step(state, batch_at(step), jax.random.fold_in(key, step))
            step += 1
            if step % log_every == 0 or step == steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = (time.perf_counter() - t0) / max(step - start, 1)
                writer.write(step, name, values)
                log(f"{name} step {step}/{steps}: " + " | ".join(f"{k} {v:.4g}" for k, v in values.items())
                    + f" | {dt * 1e3:.0f} ms/step")
            if every is not None:
                every(step, state)
            if step == stop_at_step:
                stop.signum = signal.SIGTERM
            if stop.signum is not None and step < steps:  # at the last step the caller's final save does it
                save(step, state)
                interrupted = True
                break
            if ckpt_every and step % ckpt_every == 0 and step < steps:
                save(step, state)
    return state, step, interrupted
