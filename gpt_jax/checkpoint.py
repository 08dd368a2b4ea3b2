"""Checkpoints with orbax: the train state (params, optimizer state, step) plus a JSON record of the
data position and the model config, so a resumed run continues on exactly the next batch and a
checkpoint is never loaded into (or overwritten by) a model of another shape."""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from gpt_jax.errors import UserError

CONFIG_FILE = "config.json"  # the run's full config, written once when the workdir is created


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, meta: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def restore_meta(self, step: int) -> dict:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # orbax raises many types for a damaged file
            raise self._unreadable(step, e) from None

    def restore_state(self, step: int, abstract_state):
        try:
            return self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as e:
            raise self._unreadable(step, e) from None

    def _unreadable(self, step: int, error: Exception) -> UserError:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        return UserError(f"checkpoint {os.path.join(self.directory, str(step))} could not be read "
                         f"({type(error).__name__}: {reason}); it was left in place")

    def close(self) -> None:
        self.manager.close()


def model_signature(config, vocab_size: int) -> dict:
    """The parts of a config that decide the parameter shapes and what tokens mean."""
    m = config.model.to_dict()
    a = config.attention.to_dict()
    a.pop("impl", None)  # the implementation may change between runs; the function may not
    for key in ("remat", "dtype", "dropout", "attn_dropout"):
        m.pop(key, None)
    a["schedule"] = list(a["schedule"])
    return {"model": m, "attention": a, "tokenizer": config.data.tokenizer, "vocab_size": vocab_size}


def signature_diffs(saved: dict | None, current: dict, arrow: str = "->") -> list[str]:
    """The keys where two model signatures differ, as "section.key: saved <arrow> current"."""
    saved = saved or {}
    diffs = []
    for section in sorted(set(saved) | set(current)):
        s, c = saved.get(section), current.get(section)
        if isinstance(s, dict) and isinstance(c, dict):
            diffs += [f"{section}.{k}: {s.get(k)!r} {arrow} {c.get(k)!r}" for k in sorted(set(s) | set(c))
                      if s.get(k) != c.get(k)]
        elif s != c:
            diffs.append(f"{section}: {s!r} {arrow} {c!r}")
    return diffs


def check_compatible(saved: dict, current: dict, workdir: str) -> None:
    """Refuse to resume a workdir whose checkpoint was made for another model."""
    if saved == current:
        return
    raise UserError(f"workdir {workdir} holds a checkpoint of a different model "
                    f"({'; '.join(signature_diffs(saved, current))}); use another --workdir or the original config")


def write_config(workdir: str, config) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    os.replace(tmp, path)


def read_config(workdir: str):
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise UserError(f"workdir {workdir} has no {CONFIG_FILE}: it was not made by gpt_jax.train")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))
