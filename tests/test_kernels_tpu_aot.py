"""The Pallas TPU kernel compiled by libtpu for Colab's v5e and v6e on this CPU machine (marker
`tpu_aot`: needs libtpu, `pip install -e '.[tpu]'`, not a TPU; skipped without libtpu).

This is the compile a TPU would run, Mosaic's included (kernels/tpu_compile.py). Beyond compiling, it
checks what the in-place layout is for: around the kernels, the compiled program writes only row
statistics, never a copy of a [B, T, H, D] array (a reshape that touches the tiled (H, D) plane would
be one). Run: `python -m pytest -m tpu_aot tests/test_kernels_tpu_aot.py`.
"""

import pytest

from kernels import patterns
from kernels.bench import variant_switches
from kernels.tpu_compile import CHIPS, attention_report

pytestmark = pytest.mark.tpu_aot
TOKENS, HEADS = 32768, 16


@pytest.mark.parametrize("chip", sorted(CHIPS))
@pytest.mark.parametrize("seq", [2048, 8192, 32768])
def test_benchmark_shape_compiles_and_xla_copies_nothing(chip, seq):
    """bf16, 16 heads of 128, 32K tokens, window = stride = 256: at T = 2K and 8K the strided pass
    packs 16 and 4 residues a tile, at 32K one residue is one tile."""
    r = attention_report(chip, patterns.local_strided(256, 256), seq, TOKENS // seq, HEADS, 128)
    array = TOKENS * HEADS * 128 * 2  # bytes of one bf16 [B, T, H, D] array
    assert (r["fwd"]["kernels"], r["fwd_bwd"]["kernels"]) == (2, 6)
    # only lse, delta and their reorderings between passes ([B, H, T] and lane-dense [B, H, 8, T] f32
    # arrays): less than one [B, T, H, D] array in all (the layouts before this one wrote 9 to 28)
    assert r["fwd"]["xla_bytes"] < array / 4, r["fwd"]
    assert r["fwd_bwd"]["xla_bytes"] < array, r["fwd_bwd"]


@pytest.mark.parametrize("pattern,seq,heads,kv_heads,head_dim,variant", [
    (patterns.dense(), 4096, 16, 16, 128, "default"),
    (patterns.fixed(128, 8), 8192, 16, 16, 128, "default"),                # gathered summary keys
    (patterns.local_strided(128, 128), 8192, 12, 12, 64, "default"),       # GPT-3 Small's heads, all 12 a step
    (patterns.local_strided(256, 256), 8192, 16, 16, 96, "default"),       # GPT-3 Large's head_dim
    (patterns.local_strided(256, 256), 8192, 32, 8, 128, "default"),       # GQA: 32 query heads read 8 kv heads
    (patterns.local_strided(256, 256), 8192, 16, 16, 128, "heads-16"),
    (patterns.local_strided(256, 256), 8192, 16, 16, 128, "transposed"),
], ids=["dense", "fixed", "12 heads of 64", "head_dim 96", "GQA", "16 heads a step", "transposed"])
def test_other_patterns_and_layouts_compile(pattern, seq, heads, kv_heads, head_dim, variant):
    import jax
    import jax.numpy as jnp

    from kernels.pallas_tpu import sparse_attention_tpu
    from kernels.tpu_compile import compile_for, kernel_count

    q = jax.ShapeDtypeStruct((TOKENS // seq, seq, heads, head_dim), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((TOKENS // seq, seq, kv_heads, head_dim), jnp.bfloat16)
    loss = lambda q, k, v: jnp.sum(sparse_attention_tpu(q, k, v, pattern, interpret=False).astype(jnp.float32))
    with variant_switches(variant):
        compiled = compile_for("v5e", jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv)
    passes = 2 if pattern.kind in ("local_strided", "fixed") else 1
    assert kernel_count(compiled.as_text()) == 3 * passes


def test_plan_compiles_a_sharded_train_step_for_a_two_chip_slice(capsys):
    """gpt_jax.plan --compile_for: the whole train step of a two-layer dense + local_strided model,
    sharded over fsdp=2 (the kernels run per shard through shard_map), compiled for two v5e chips.
    In this process: libtpu allows one process at a time, and this one has it loaded already."""
    from conftest import REPO
    from gpt_jax import plan

    plan.main(["--config", f"{REPO}/experiments/default.py", "--mesh", "fsdp=2", "--compile_for", "v5e",
               "--config.model.n_layer=2"])
    lines = capsys.readouterr().out.splitlines()
    head = next(line for line in lines if line.startswith("compiled for 2 x v5e"))
    assert head.endswith("9 Pallas kernel launches a step")  # dense: 3 kernels, local_strided: 6
    total = next(line for line in lines if "XLA's figure for the compiled step" in line)
    assert "fits in 16 GiB of v5e memory" in total
    assert any(line.strip().startswith("ops a step") for line in lines)


@pytest.mark.parametrize("pattern,seq,heads,head_dim", [
    (patterns.dense(), 256, 6, 64),                     # shakespeare_char's layer
    (patterns.local_strided(256, 256), 2048, 16, 128),  # the benchmark's, its strided pass hashing positions
    (patterns.fixed(128, 8), 2048, 16, 128),             # gathered summary keys mapped back to positions
], ids=["dense", "local_strided", "fixed"])
def test_kernels_with_attention_dropout_compile(pattern, seq, heads, head_dim):
    """The dropout hash's int32 multiplies, xors and shifts on vectors and the seeds' SMEM blocks are
    what Mosaic TPU compiles (the interpreter runs anything)."""
    import jax
    import jax.numpy as jnp

    from kernels.pallas_tpu import sparse_attention_tpu
    from kernels.tpu_compile import compile_for, kernel_count

    def loss(q, k, v, seed):
        o = sparse_attention_tpu(q, k, v, pattern, interpret=False, dropout_rate=0.2, dropout_seed=seed)
        return jnp.sum(o.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((TOKENS // seq, seq, heads, head_dim), jnp.bfloat16)
    compiled = compile_for("v5e", jax.grad(loss, argnums=(0, 1, 2)), x, x, x, jax.ShapeDtypeStruct((), jnp.int32))
    assert kernel_count(compiled.as_text()) == 3 * (1 if pattern.kind == "dense" else 2)
