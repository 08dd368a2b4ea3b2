"""The training benchmark's CLI: its JSON is self-consistent and describes the configured model."""

import json

from conftest import run_cli
from test_cli import TINY


def test_bench_train_reports_consistent_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("gpt_jax.bench_train", *TINY, "--iters", "3", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert (r["batch_size"], r["seq_len"]) == (8, 64)
    assert r["attention"] == ["dense", "local_strided(window=16, stride=16)"]
    assert r["ms_p10"] <= r["ms_per_iter"] <= r["ms_p90"]
    assert abs(r["tokens_per_s"] - 8 * 64 / (r["ms_per_iter"] / 1e3)) < 1e-6 * r["tokens_per_s"]
    assert "ms/iter" in proc.stdout


def test_bench_train_rejects_bad_iters():
    proc = run_cli("gpt_jax.bench_train", *TINY, "--iters", "0")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --iters")
