"""Metrics to a JSONL file and TensorBoard event files in the workdir (the console is the loop's)."""

from __future__ import annotations

import json
import os

import jax


class MetricsWriter:
    def __init__(self, workdir: str):
        self.enabled = jax.process_index() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
            except ImportError:  # TensorBoard is optional; JSONL always works
                self._tb = None

    def write(self, step: int, split: str, values: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: float(v) for k, v in values.items()}}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in values.items():
                self._tb.add_scalar(f"{split}/{k}", float(v), step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str, split: str | None = None) -> list[dict]:
    """Records in step order. A run killed between checkpoints redoes some steps when it resumes:
    the later record of a (split, step) wins, as it is the one the surviving run continued from."""
    path = os.path.join(workdir, "metrics.jsonl")
    latest = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                latest[(r["split"], r["step"])] = r
    records = sorted(latest.values(), key=lambda r: (r["step"], r["split"]))
    return [r for r in records if split is None or r["split"] == split]
