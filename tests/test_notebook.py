"""Runs notebooks/colab_tpu.ipynb top to bottom on CPU (its tiny mode) and checks what it produced."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO_ROOT / "notebooks" / "colab_tpu.ipynb"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _SameInterpreterKernelManager(KernelManager):
    """Starts the python3 kernel with this interpreter, whatever `python` a kernelspec names."""

    def format_kernel_cmd(self, extra_arguments=None):
        cmd = super().format_kernel_cmd(extra_arguments)
        if "ipykernel_launcher" in cmd:
            cmd[0] = sys.executable
        return cmd


def _stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_notebook_is_committed_clean():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, "commit the notebook with outputs cleared"


def test_notebook_runs_tiny(tmp_path, monkeypatch):
    workdir = tmp_path / "workdir"
    # The kernel inherits this environment: tiny mode, our workdir, and the checkout on the path
    # (so the install cell finds gpt_jax and skips), on CPU.
    monkeypatch.setenv("GPT_JAX_NOTEBOOK_TINY", "1")
    monkeypatch.setenv("GPT_JAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, km=_SameInterpreterKernelManager(kernel_name="python3"), timeout=300,
                            kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, with the traceback, if any cell fails

    cells = _code_cells(nb)
    install, devices, config, train, plot, sample, kernel = cells
    assert "skipping the install" in _stream_text(install)
    assert "mesh axes" in _stream_text(devices) and "cpu" in _stream_text(devices)
    assert "TINY=True" in _stream_text(config) and str(workdir) in _stream_text(config)

    steps = list((workdir / "checkpoints").iterdir())
    assert [p.name for p in steps if p.name.isdigit()] == ["30"], steps
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    val_losses = [r["loss"] for r in records if r["split"] == "val"]
    assert len(train_losses) >= 2 and len(val_losses) >= 1
    assert train_losses[-1] < train_losses[0], train_losses

    png = workdir / "loss.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert any("image/png" in o.get("data", {}) for o in plot.outputs), "the plot cell should display the figure"

    text = _stream_text(sample)
    assert text.startswith("def ") and len(text.rstrip("\n")) > len("def "), text  # the prompt, then new text

    # the kernel section: the bf16 kernel within 1e-2 of the f32 reference, and the benchmark's rows
    errors = re.findall(r"head_dim (\d+) (out|dq|dk|dv): relative error .* ([0-9.]+e[-+][0-9]+)", _stream_text(kernel))
    assert [(d, name) for d, name, _ in errors] == [(d, n) for d in ("128", "64") for n in ("out", "dq", "dk", "dv")]
    assert all(float(err) < 1e-2 for _, _, err in errors), errors
    rows = json.loads((workdir / "attn_bench" / "bench.json").read_text())["rows"]
    assert {r["impl"]: r["status"] for r in rows} == {"ours": "ok", "ours:transposed": "ok", "ours:heads-16": "ok",
                                                      "splash": "ok", "xla_mask": "ok", "reference": "ok"}
