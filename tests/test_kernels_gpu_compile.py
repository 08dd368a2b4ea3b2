"""kernels.gpu_compile: what it reads out of Mosaic GPU's dumps, and (marker gpu_aot, skipped without
jax's CUDA plugin) the Mosaic GPU kernels compiled by ptxas for an H100 on a machine without a GPU."""

import json
import re
import subprocess
import sys

import pytest

from kernels import gpu_compile
from kernels.gpu_compile import KernelReport

PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'dkv_band_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for dkv_band_mosaic_gpu_kernel
    48 bytes stack frame, 60 bytes spill stores, 108 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 48 bytes cumulative stack size, 1 bytes smem
"""

LAUNCH = ("    gpu.launch async [%10] blocks(%arg2, %arg3, %arg4) in (%arg8 = %c1, %arg9 = %c256_3, %arg10 = %c16) "
          "threads(%arg5, %arg6, %arg7) in (%arg11 = %c384, %arg12 = %c1, %arg13 = %c1) "
          "dynamic_shared_memory_size %c166968_i32 {\n")


def test_reads_registers_spills_and_launch_from_the_dumps(tmp_path):
    assert gpu_compile.parse_ptxas(PTXAS) == (168, 60, 108)
    assert gpu_compile.parse_launch("module {\n" + LAUNCH + "}") == (256 * 16, 384, 166968)
    with pytest.raises(ValueError, match="not a ptxas report"):
        gpu_compile.parse_ptxas("ptxas fatal   : Unresolved extern function")
    # A folder as Mosaic GPU leaves it: one report per kernel, named after the kernel
    (tmp_path / "dkv_band_0.ptxas").write_text(PTXAS)
    (tmp_path / "dkv_band_0.after_layout_inference.txt").write_text(LAUNCH)
    (r,) = gpu_compile.read_dumps(str(tmp_path))
    assert (r.name, r.grid, r.threads, r.smem, r.registers, r.spill_stores, r.spill_loads) == (
        "dkv_band", 4096, 384, 166968, 168, 60, 108)


def test_ctas_per_sm_is_the_tightest_limit():
    # 384 threads at 168 registers take 64,512 of the SM's 65,536 registers: one CTA, 4096 CTAs in 31 waves
    big = KernelReport("k", grid=4096, threads=384, smem=64 * 1024, registers=168, spill_stores=0, spill_loads=0)
    assert big.ctas_per_sm == 1 and big.waves == pytest.approx(4096 / 132)
    # registers allow 4 (65536 / (128 * 128)); 100 KiB + 1 KiB reserved each: shared memory allows 2
    smem_bound = KernelReport("k", grid=264, threads=128, smem=100 * 1024, registers=128, spill_stores=0, spill_loads=0)
    assert smem_bound.ctas_per_sm == 2 and smem_bound.waves == pytest.approx(1.0)
    # small CTAs: 2048 threads an SM
    threads_bound = KernelReport("k", grid=132, threads=512, smem=1024, registers=32, spill_stores=0, spill_loads=0)
    assert threads_bound.ctas_per_sm == 4


def test_cli_says_what_it_needs(monkeypatch):
    monkeypatch.setattr(gpu_compile, "have_cuda_plugin", lambda: False)
    with pytest.raises(SystemExit, match=r"kernels.gpu_compile needs jax's CUDA plugin: pip install -e '.\[gpu_compile\]'"):
        gpu_compile.main(["--seq", "2048"])


@pytest.mark.gpu_aot
def test_benchmark_shape_compiles_for_an_h100_without_spills_in_the_forward(tmp_path):
    """ptxas builds every kernel of local+strided attention forward and backward at T = 32K for sm_90a;
    each fits one CTA an SM (three warpgroups) and the forward kernels do not spill (kernels/NOTES.md
    lists the spills elsewhere: the backward's, and the memory warpgroup's at T = 2K)."""
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, "-m", "kernels.gpu_compile", "--seq", "32768", "--out", str(out)], check=True,
                   capture_output=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == sorted(f"{k}_{p}" for k in ("fwd", "dq", "dkv") for p in ("band", "strided"))
    for r in rows.values():
        assert r["grid"] == 16 * (32768 // 128) and r["threads"] == 384
        assert r["smem"] <= 227 * 1024 and r["ctas_per_sm"] == 1
    for name in ("fwd_band", "fwd_strided"):
        assert rows[name]["spill_stores"] == rows[name]["spill_loads"] == 0, rows[name]


@pytest.mark.gpu_aot
def test_attention_dropout_kernels_compile_for_an_h100_without_spills_at_shakespeares_shape(tmp_path):
    """shakespeare_char's attention layer (batch 64, T = 256, 6 heads of 64) with dropout in the kernels:
    the hash's integer work fits the registers (kernels/NOTES.md: no spills with or without it)."""
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, "-m", "kernels.gpu_compile", "--pattern", "dense", "--seq", "256", "--tokens",
                    "16384", "--heads", "6", "--head-dim", "64", "--dropout", "0.2", "--out", str(out)],
                   check=True, capture_output=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == ["dkv_causal", "dq_causal", "fwd_causal"]
    for r in rows.values():
        assert r["spill_stores"] == r["spill_loads"] == 0, r


@pytest.mark.gpu_aot
def test_plan_compiles_the_sparse_train_step_for_h100s():
    """gpt_jax.plan --compile_for h100: the sharded train step of a GPT-3-style model with one
    local+strided layer launches its six Mosaic GPU kernels (forward: band and strided passes; backward:
    dq and dk/dv of each) a micro-batch, and XLA's memory per GPU is printed."""
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.plan", "--config", "experiments/gpt3_small_sparse.py",
                           "--config.model.n_layer=2", "--config.train.batch_size=8", "--config.train.grad_accum=1",
                           "--mesh", "fsdp=2", "--compile_for", "h100"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "compiled for 2 x h100 (CUDA plugin; not run): 6 Pallas kernel launches a step" in proc.stdout
    assert "fits in 80 GiB of h100 memory" in proc.stdout


def _step_work(stdout: str) -> tuple[int, float]:
    """(ops a step, GiB written a step) from a --compile_for report."""
    ops = int(re.search(r"ops a step\s+(\d+)", stdout).group(1))
    return ops, float(re.search(r"written a step\s+([\d.]+) GiB", stdout).group(1))


@pytest.mark.gpu_aot
def test_train_step_compiles_to_what_a_plain_flax_step_does():
    """Without dropout, gpt_jax's step at shakespeare_char's shape compiles for an H100 to what the
    hand-written step of gpt_jax.bench_plain does: logical axes, sharding constraints and the Trainer
    leave nothing behind in the compiled program (BENCHMARKS.md: 434 ops against 435)."""
    shape = ["--config", "experiments/shakespeare_char.py", "--config.model.vocab_size=65",
             "--config.model.n_layer=2", "--config.model.dropout=0", "--config.model.attn_dropout=0",
             "--compile_for", "h100"]
    ours = subprocess.run([sys.executable, "-m", "gpt_jax.plan", *shape, "--mesh", "data=1"],
                          capture_output=True, text=True)
    plain = subprocess.run([sys.executable, "-m", "gpt_jax.bench_plain", *shape], capture_output=True, text=True)
    assert ours.returncode == 0 and plain.returncode == 0, ours.stderr[-2000:] + plain.stderr[-2000:]
    (ours_ops, ours_gib), (plain_ops, plain_gib) = _step_work(ours.stdout), _step_work(plain.stdout)
    assert abs(ours_ops - plain_ops) <= 2, (ours_ops, plain_ops)
    assert abs(ours_gib - plain_gib) <= 0.02 * plain_gib, (ours_gib, plain_gib)


@pytest.mark.gpu_aot
def test_fixed_pattern_kernels_compile_for_an_h100(tmp_path):
    """fixed(128, 16) at T = 2K, 16 heads of 128: ptxas builds the block-diagonal pass's and the summary
    pass's three kernels each; the summary dk/dv kernel runs over the 256 gathered keys only (two
    128-key tiles a head), and everything fits one CTA an SM."""
    out = tmp_path / "k.json"
    subprocess.run([sys.executable, "-m", "kernels.gpu_compile", "--pattern", "fixed", "--block", "128", "--c", "16",
                    "--seq", "2048", "--out", str(out)], check=True, capture_output=True)
    rows = {r["name"]: r for r in json.loads(out.read_text())}
    assert sorted(rows) == sorted(f"{k}_{p}" for k in ("fwd", "dq", "dkv") for p in ("blocks", "summary"))
    batch = 32768 // 2048
    assert rows["dkv_summary"]["grid"] == 16 * batch * (2048 // 128 * 16 // 128)
    assert rows["fwd_summary"]["grid"] == 16 * batch * (2048 // 128)
    for r in rows.values():
        assert r["smem"] <= 227 * 1024 and r["ctas_per_sm"] == 1, r
