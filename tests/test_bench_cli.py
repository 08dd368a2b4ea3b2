"""The benchmark CLIs (training step, generation): their JSON is self-consistent and describes the
configured model."""

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


def test_bench_generate_cached_and_uncached_agree(tmp_path):
    out = tmp_path / "gen.json"
    proc = run_cli("gpt_jax.bench_generate", *TINY, "--config.model.dtype=float32", "--batch", "1,2",
                   "--new-tokens", "8", "--prompt-len", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        # float32 greedy decoding: the cache must reproduce the full forward pass token for token.
        assert r["agreement"] == 1.0
        assert r["forced_agreement"] == 1.0 and r["max_gap"] <= 1e-5
        assert abs(r["cached_tokens_per_s"] - r["batch"] * 8 / r["cached_s"]) < 1e-6 * r["cached_tokens_per_s"]
    assert "cached tok/s" in proc.stdout


def test_teacher_forced_check_catches_tokens_the_model_would_not_choose():
    import jax
    import numpy as np

    from gpt_jax.bench_generate import teacher_forced_check, uncached_generate
    from gpt_jax.model import GPTConfig
    from test_model import init_tiny

    model_cfg, params = init_tiny()
    model_cfg = GPTConfig(**{**model_cfg.__dict__, "dtype": "float32"})
    prompt = np.asarray(jax.random.randint(jax.random.key(0), (2, 4), 0, 100), np.int32)
    fn, args = uncached_generate(model_cfg, params, prompt, 12)
    greedy = np.asarray(fn(*args))
    assert teacher_forced_check(model_cfg, params, prompt, greedy) == {"forced_agreement": 1.0, "max_gap": 0.0}
    # The first token's context is the prompt alone, so any other first token is not the argmax there.
    wrong = greedy.copy()
    wrong[:, 0] = (greedy[:, 0] + 1) % model_cfg.vocab_size
    check = teacher_forced_check(model_cfg, params, prompt, wrong)
    assert check["forced_agreement"] <= 1 - 2 / greedy.size and check["max_gap"] > 1e-3
