"""The benchmark CLI on tiny CPU sizes: every requested alternative gets a row, unavailable ones say
why, timings are positive, and the FLOP count follows the documented pairs-based convention."""

import json

import jax
import pytest

from kernels import bench, patterns


def test_bench_cli_writes_rows_json_and_plot(tmp_path, capsys):
    bench.main(["--pattern", "local_strided", "--window", "64", "--stride", "32", "--seq", "128,256",
                "--tokens", "256", "--heads", "2", "--head-dim", "16", "--dtype", "float32",
                "--repeats", "2", "--warmup", "1", "--out", str(tmp_path)])
    assert "TFLOP/s" in capsys.readouterr().out
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert [(r["impl"], r["seq"]) for r in rows] == [(i, s) for s in (128, 256) for i in bench.ALL_IMPLS]
    pattern = patterns.local_strided(64, 32)
    on_cpu = jax.devices()[0].platform == "cpu"
    for r in rows:
        assert r["batch"] == 256 // r["seq"]
        if r["impl"] in ("xla_mask", "reference"):  # what a CPU can run
            assert r["status"] == "ok"
            assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
            assert r["pairs"] == pattern.pairs(r["seq"])
            assert r["flops_fwd"] == pattern.pairs(r["seq"]) * 4 * 16 * 2 * r["batch"]
            assert r["flops_fwd_bwd"] == 3.5 * r["flops_fwd"]
        elif on_cpu:  # cuDNN, FlexAttention and our kernel (no interpreter timing asked) are not on a CPU
            assert r["status"].startswith("n/a (") and r["status"].endswith(")")
        else:
            assert r["status"] == "ok" or r["status"].startswith("n/a (")


def test_flops_formula_counts_pattern_pairs():
    p = patterns.local_strided(256, 256)
    # share of causal pairs quoted in ANCHORS.md for T=2048
    assert abs(p.density(2048) - 0.238) < 5e-4
    assert bench.flops_forward(p, 2048, 16, 16, 128) == p.pairs(2048) * 4 * 128 * 16 * 16


def test_block_k_sweep_gives_our_kernel_one_row_per_block(tmp_path):
    rows = bench.main(["--pattern", "local_strided", "--window", "64", "--stride", "64", "--seq", "256",
                       "--tokens", "256", "--heads", "1", "--head-dim", "128", "--dtype", "float32",
                       "--impls", "ours,reference", "--block-k", "128,256", "--interpret",
                       "--repeats", "1", "--warmup", "0"])
    assert [(r["impl"], r["block_k"]) for r in rows] == [("ours:bk128", 128), ("ours:bk256", 256),
                                                         ("reference", None)]
    assert all(r["status"] == "ok" and r["fwd_ms"] > 0 for r in rows), [r["status"] for r in rows]


def test_variants_set_the_kernel_switches_only_while_timed(monkeypatch):
    from kernels import pallas_gpu, pallas_tpu_layout

    switches = lambda: (pallas_gpu.PINGPONG, pallas_gpu.STRIDED_IN_PLACE, pallas_tpu_layout.IN_PLACE,
                        pallas_tpu_layout.TILE_HEADS)
    seen = []
    monkeypatch.setattr(bench, "_bench_jax", lambda *a: seen.append(switches()) or (patterns.dense(), 1.0, 2.0))
    rows = bench.main(["--seq", "128", "--tokens", "128", "--heads", "1", "--head-dim", "64", "--impls", "ours",
                       "--variants", "default,no-pingpong,transposed,heads-16"])
    assert [r["impl"] for r in rows] == ["ours", "ours:no-pingpong", "ours:transposed", "ours:heads-16"]
    assert seen == [(True, True, True, 8), (False, True, True, 8), (True, False, False, 8), (True, True, True, 16)]
    assert switches() == (True, True, True, 8)  # restored


def test_per_head_pattern_rows_and_bad_pattern_names():
    rows = bench.main(["--pattern", "local/strided", "--window", "16", "--stride", "8", "--seq", "64",
                       "--tokens", "64", "--heads", "2", "--head-dim", "16", "--dtype", "float32",
                       "--impls", "reference,xla_mask", "--repeats", "1", "--warmup", "0"])
    status = {r["impl"]: r["status"] for r in rows}
    assert status["reference"] == "ok" and status["xla_mask"].startswith("n/a (per-head")
    pattern = patterns.heads(patterns.local(16), patterns.strided(8))
    assert rows[0]["flops_fwd"] == pattern.pairs(64) * 4 * 16 * 2  # the head groups' mean pairs
    try:
        bench.main(["--pattern", "diagonal"])
    except SystemExit as e:
        assert "unknown attention pattern 'diagonal'" in str(e)
    else:
        raise AssertionError("an unknown pattern name must exit")


def test_splash_wrapper_computes_the_pattern():
    """The splash row times the same function as the others: its output and gradients (TPU interpreter)
    equal the reference for a strided, a fixed and a per-head pattern."""
    import jax.numpy as jnp
    import numpy as np

    from kernels import reference_attention
    from kernels.bench_splash import splash_attention

    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v, do = (jax.random.normal(kk, (1, 128, 2, 128), jnp.float32) for kk in keys)
    for pattern in (patterns.local_strided(16, 16), patterns.fixed(32, 4),
                    patterns.heads(patterns.local(8), patterns.strided(16))):
        attend = splash_attention(pattern, 128, 2, 128, interpret=True)
        out, vjp = jax.vjp(attend, q, k, v)
        ref, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, pattern), q, k, v)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=str(pattern))
        for g, r in zip(vjp(do), ref_vjp(do)):
            np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-4, err_msg=str(pattern))


def test_tpu_estimate_counts_what_the_kernel_visits():
    from kernels.tpu_estimate import estimate, main

    pattern = patterns.local_strided(256, 256)
    eight, sixteen = (estimate(pattern, 8192, 4, 16, 128, tile_heads=n) for n in (8, 16))
    assert eight["heads_a_step"] == [8, 8] and sixteen["heads_a_step"] == [16, 16]
    assert sixteen["steps_fwd"] * 2 == eight["steps_fwd"] and sixteen["steps_bwd"] * 2 == eight["steps_bwd"]
    assert pattern.pairs(8192) * 4 * 16 <= eight["visited_pairs"] <= 8192 * 8192 * 4 * 16  # blocks cover the pairs
    dense = estimate(patterns.dense(), 8192, 1, 1, 128)
    assert dense["steps_fwd"] == 16 * 17 // 2  # 512-row tiles, one step per visited block: no padding
    rows = main(["--seq", "2048", "--tokens", "2048", "--heads", "12", "--head-dim", "64", "--tile-heads", "8"])
    assert rows[0]["heads_a_step"] == [12, 12]  # 8 does not divide 12: all of them


def test_tpu_compile_counts_the_bytes_xla_writes_outside_the_kernels(monkeypatch):
    """On a compiled program's entry computation: copies, reshapes and fusions count at their result's
    bytes; views (bitcast), tuple pieces, parameters and the kernels themselves do not."""
    from kernels import tpu_compile

    hlo = """HloModule m

%fused (p: f32[4,8]) -> f32[4,8] {
  %p = f32[4,8]{1,0} parameter(0)
  ROOT %n = f32[4,8]{1,0} negate(%p)
}

ENTRY %main (q: bf16[2,64,16,128]) -> bf16[2,64,16,128] {
  %q = bf16[2,64,16,128]{3,2,1,0:T(8,128)(2,1)} parameter(0), sharding={replicated}
  %b = bf16[2,8,8,16,128]{4,3,2,1,0:T(8,128)(2,1)} bitcast(%q)
  %r = bf16[2,64,2048]{2,1,0:T(8,128)(2,1)} reshape(%q)
  %k = (bf16[2,64,2048]{2,1,0}, f32[2,16,8,64]{3,2,1,0}) custom-call(%r), custom_call_target="tpu_custom_call"
  %o = bf16[2,64,2048]{2,1,0} get-tuple-element(%k), index=0
  %f = f32[4,8]{1,0} fusion(%o), kind=kLoop, calls=%fused
  ROOT %c = bf16[2,64,16,128]{3,2,1,0:T(8,128)(2,1)} copy(%o)
}
"""
    ops = tpu_compile.data_ops(hlo)
    array = 2 * 64 * 16 * 128 * 2
    assert ops == [("reshape", "bf16[2,64,2048]", array), ("fusion", "f32[4,8]", 128), ("copy", "bf16[2,64,16,128]", array)]
    # what plan --compile_for counts as a step's writes: the kernel's results too (both of its outputs)
    with_kernels = tpu_compile.data_ops(hlo, free=tpu_compile.FREE_OPS - {"custom-call"})
    assert [(op, n) for op, _, n in with_kernels][1] == ("custom-call", array + 2 * 16 * 8 * 64 * 4)
    assert tpu_compile.kernel_count(hlo) == 1
    monkeypatch.setattr(tpu_compile, "have_libtpu", lambda: False)
    with pytest.raises(SystemExit, match="kernels.tpu_compile needs libtpu"):
        tpu_compile.main(["--seq", "2048"])
    with pytest.raises(SystemExit, match="--chip v7"):
        tpu_compile.main(["--chip", "v7"])
