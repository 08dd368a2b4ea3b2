"""Train a GPT from an experiment config.

    python -m gpt_jax.train --config experiments/default.py --workdir runs/default \
        [--config.train.steps=2000] [--config.data.path=PATH] [--config.<any key>=<value>]

Kill it at any moment (Ctrl-C, SIGTERM): it saves a checkpoint and the same command resumes on
exactly the batch it would have seen next. `run()` is the same loop for notebooks and tests.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import flags
from tqdm import tqdm

from gpt_jax import checkpoint as ckpt_lib
from gpt_jax import cli
from gpt_jax import sharding as shd
from gpt_jax.data import build_dataset, format_epochs_report
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.flops import device_peak_flops, train_flops_per_token
from gpt_jax.metrics import MetricsWriter
from gpt_jax.model import GPT, GPTConfig, count_params
from gpt_jax.optim import lr_schedule, make_optimizer
from gpt_jax.train_step import Trainer


@dataclasses.dataclass
class RunResult:
    step: int
    train_loss: float | None
    val_loss: float | None
    interrupted: bool
    workdir: str


class StopSignal:
    """Turns SIGINT/SIGTERM into a request to save and stop at the next step boundary."""

    def __init__(self):
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # a second Ctrl-C: stop now, the last periodic checkpoint stays
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def build_model(config, vocab_size: int) -> GPTConfig:
    try:
        model_cfg = GPTConfig.from_config(config, vocab_size)
        model_cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if model_cfg.vocab_size < vocab_size:
        raise UserError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the tokenizer's {vocab_size}")
    return model_cfg


def _log(msg: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(msg)


def run(config, workdir: str, *, stop_at_step: int | None = None, progress: bool = True) -> RunResult:
    """Train until config.train.steps (or stop_at_step, which behaves like a signal there)."""
    train = config.train
    os.makedirs(workdir, exist_ok=True)
    dataset = build_dataset(config.data, workdir, config.seed)
    model_cfg = build_model(config, dataset.tokenizer.vocab_size)
    seq_len = model_cfg.block_size

    checkpointer = ckpt_lib.Checkpointer(workdir, keep=train.keep_checkpoints)
    signature = ckpt_lib.model_signature(config, model_cfg.vocab_size)
    latest = checkpointer.latest_step()
    meta = checkpointer.restore_meta(latest) if latest is not None else None
    if meta is not None:
        ckpt_lib.check_compatible(meta["model_signature"], signature, workdir)
    elif jax.process_index() == 0:
        ckpt_lib.write_config(workdir, config)

    mesh = shd.make_mesh(config.mesh)
    shd.check_batch(train.batch_size, train.grad_accum, mesh)
    trainer = Trainer(GPT(model_cfg), make_optimizer(train), mesh, config.sharding_rules, grad_accum=train.grad_accum)

    if latest is not None:
        state = checkpointer.restore_state(latest, trainer.abstract_state)
        _log(f"resumed from step {latest} in {checkpointer.directory}")
    else:
        state = trainer.init_state(jax.random.key(config.seed))
    start = int(state.step)

    flops_per_token = train_flops_per_token(model_cfg, seq_len)
    tokens_per_step = train.batch_size * seq_len
    peak = train.peak_flops or device_peak_flops()
    _log(f"model: {count_params(state.params) / 1e6:.2f}M parameters, {model_cfg.n_layer} layers "
         f"({', '.join(str(p) for p in model_cfg.patterns[:2])}{', ...' if model_cfg.n_layer > 2 else ''}), "
         f"context {seq_len}, vocab {model_cfg.vocab_size}")
    _log(f"mesh: {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} device(s); "
         f"{flops_per_token / 1e6:.1f} MFLOP/token (attention counts the pairs each pattern computes)")
    _log(format_epochs_report(dataset.epochs_report(train.steps * tokens_per_step), train.steps * tokens_per_step))

    dropout_base = jax.random.key(config.seed + 1)
    schedule = lr_schedule(train)
    writer = MetricsWriter(workdir)
    lr_of = lambda s: float(schedule(s))  # noqa: E731

    def batch_at(step):
        return shd.host_local_batch(dataset.train_batch(step, train.batch_size, seq_len), mesh)

    def evaluate():
        losses = [trainer.eval_step(state.params, shd.host_local_batch(
            dataset.val_batch(i, train.batch_size, seq_len), mesh))["loss"] for i in range(train.eval_batches)]
        return float(np.mean(jax.device_get(losses)))

    def save(step):
        checkpointer.save(step, state, {"model_signature": signature, "data": {"next_step": step}})

    # Compile ahead (MaxText style) to report memory before the first step.
    step_fn = trainer.train_step
    if start < train.steps:
        compiled = trainer.train_step.lower(state, batch_at(start), dropout_base).compile()
        mem = compiled.memory_analysis()
        if mem is not None:
            _log(f"compiled train step: {mem.argument_size_in_bytes / 2**20:.0f} MiB arguments, "
                 f"{mem.temp_size_in_bytes / 2**20:.0f} MiB temporaries per device")
        step_fn = compiled

    train_loss = val_loss = None
    interrupted = False
    bar = tqdm(total=train.steps, initial=start, disable=not progress or jax.process_index() > 0,
               dynamic_ncols=True, unit="step", file=sys.stdout)
    last_time, last_step = time.perf_counter(), start
    try:
        with StopSignal() as stop:
            step = start
            while step < train.steps:
                state, metrics = step_fn(state, batch_at(step), jax.random.fold_in(dropout_base, step))
                step += 1
                bar.update(1)
                if step % train.log_every == 0 or step == train.steps:
                    train_loss = float(metrics["loss"])  # waits for the step: the timing below is honest
                    now = time.perf_counter()
                    tok_s = (step - last_step) * tokens_per_step / (now - last_time)
                    last_time, last_step = now, step
                    mfu = tok_s * flops_per_token / (peak * jax.device_count()) if peak else None
                    bar.set_postfix_str(f"loss {train_loss:.4f} | {tok_s / 1e3:.1f}K tok/s | "
                                        f"MFU {f'{100 * mfu:.1f}%' if mfu is not None else 'n/a'}")
                    writer.write(step, "train", {"loss": train_loss, "grad_norm": float(metrics["grad_norm"]),
                                                 "lr": lr_of(step - 1), "tokens_per_s": tok_s,
                                                 **({"mfu": mfu} if mfu is not None else {})})
                if train.eval_every and (step % train.eval_every == 0 or step == train.steps):
                    val_loss = evaluate()
                    writer.write(step, "val", {"loss": val_loss})
                    _log(f"step {step}: val loss {val_loss:.4f}")
                    last_time = time.perf_counter()  # evaluation time is not training time
                if step == stop_at_step:
                    stop.signum = signal.SIGTERM
                if stop.signum is not None:
                    save(step)
                    interrupted = True
                    break
                if train.ckpt_every and step % train.ckpt_every == 0 and step < train.steps:
                    save(step)
            else:
                if latest != train.steps:
                    save(step)
            checkpointer.wait()
    finally:
        bar.close()
        writer.close()
        checkpointer.close()
    if interrupted:
        _log(f"stopped at step {step}; checkpoint saved. Run the same command to resume.")
    return RunResult(step=step, train_loss=train_loss, val_loss=val_loss, interrupted=interrupted, workdir=workdir)


def _define_flags(fv):
    flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics and the tokenizer", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.train", _define_flags)
    if not fv.workdir:
        raise UserError("--workdir is required")
    shd.maybe_initialize_distributed()
    result = run(fv.config, fv.workdir)
    if result.interrupted:
        sys.exit(130)
    if fv.config.train.sample_tokens and jax.process_index() == 0:
        from gpt_jax.sample import sample_from_workdir
        print("--- sample ---")
        print(sample_from_workdir(fv.workdir, prompt="", max_new_tokens=fv.config.train.sample_tokens,
                                  temperature=0.8, top_k=40, seed=fv.config.seed))


if __name__ == "__main__":
    main()
