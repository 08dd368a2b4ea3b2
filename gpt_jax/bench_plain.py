"""The yardstick for gpt_jax.bench_train: an experiment's shape as a minimal hand-written Flax step.

    python -m gpt_jax.bench_plain --config experiments/shakespeare_char.py \
        --config.data.path=../shared/data/tinyshakespeare.txt [--iters 50] [--warmup 10] [--out plain.json]
    python -m gpt_jax.bench_plain ... --lookup_in_compute_dtype   # Flax's nn.Embed(dtype=bfloat16) lookup
    python -m gpt_jax.bench_plain ... --compile_for h100           # compile only, no GPU needed

`PlainGPT` computes what gpt_jax.model.GPT computes with dense attention and no dropout (the same
layers, widths and maths, tied embeddings; Flax's default initializers; tests/test_bench_plain.py checks the logits are
equal given the same weights), in the fewest lines: no logical axes, no sharding constraints, no
Trainer, one device, the same optax optimizer. Its step time is what this shape costs in plain jax
on this device, so bench_train's time above it is what gpt_jax's own step adds (run bench_train with
`--config.model.dropout=0 --config.model.attn_dropout=0` to compare like with like; ANCHORS.md's
plain Flax GPT-2 step matched nanoGPT at 12 x 1024).

`--lookup_in_compute_dtype` casts the embedding table to the compute dtype before the lookup, as
Flax's `nn.Embed(dtype=bfloat16)` does, so the lookup's gradient is a bfloat16 scatter-add: slow on
a GPU when a small vocabulary makes every row a hot spot (gpt_jax.model.embed_tokens says why).
"""

from __future__ import annotations

import functools
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import flags

from gpt_jax import cli
from gpt_jax.bench_train import check_timing_flags, define_timing_flags, throughput, time_steps, timing_table
from gpt_jax.data import build_dataset
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.model import DTYPES, GPTConfig
from gpt_jax.optim import make_optimizer
from gpt_jax.train import build_model
from kernels.platform import target_platform


class PlainBlock(nn.Module):
    n_head: int
    use_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        b, t, c = x.shape
        dense = functools.partial(nn.Dense, dtype=self.dtype, use_bias=self.use_bias)
        norm = functools.partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype, use_bias=self.use_bias)
        qkv = dense(3 * c, name="c_attn")(norm(name="ln_1")(x)).reshape(b, t, 3, self.n_head, c // self.n_head)
        # cuDNN's fused attention on a GPU, as gpt_jax does for dense layers; XLA's elsewhere
        impl = "cudnn" if target_platform() == "gpu" else "xla"
        y = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], is_causal=True,
                                         implementation=impl)
        x = x + dense(c, name="attn_proj")(y.reshape(b, t, c))
        h = nn.gelu(dense(4 * c, name="c_fc")(norm(name="ln_2")(x)), approximate=True)
        return x + dense(c, name="mlp_proj")(h)


class PlainGPT(nn.Module):
    cfg: GPTConfig
    lookup_in_compute_dtype: bool = False

    @nn.compact
    def __call__(self, tokens):
        """tokens [batch, seq] -> logits [batch, seq, vocab] in the compute dtype."""
        cfg, dtype = self.cfg, DTYPES[self.cfg.dtype]
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype if self.lookup_in_compute_dtype else None,
                       name="wte")
        wpe = self.param("wpe", nn.initializers.normal(0.02), (cfg.block_size, cfg.n_embd))
        x = (wte(tokens) + wpe[:tokens.shape[1]]).astype(dtype)
        for i in range(cfg.n_layer):
            x = PlainBlock(cfg.n_head, cfg.use_bias, dtype, name=f"h_{i}")(x)
        x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, use_bias=cfg.use_bias, name="ln_f")(x)
        return wte.attend(x)


def make_step(model: PlainGPT, tx: optax.GradientTransformation):
    """The jitted step (params, opt_state, batch [b, t + 1]) -> (params, opt_state, loss), state donated."""
    def loss_fn(params, batch):
        logits = model.apply({"params": params}, batch[:, :-1]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def _check_plain(model_cfg: GPTConfig) -> None:
    if any(not p.is_dense for p in model_cfg.patterns):
        raise UserError("gpt_jax.bench_plain builds dense attention only; set --config.attention.schedule=dense")


def benchmark(config, *, iters: int, warmup: int, lookup_in_compute_dtype: bool = False,
              distinct_batches: int = 8) -> dict:
    dataset = build_dataset(config.data, None, config.seed)
    model_cfg = build_model(config, dataset.tokenizer.vocab_size)
    _check_plain(model_cfg)
    train, seq = config.train, model_cfg.block_size
    model = PlainGPT(model_cfg, lookup_in_compute_dtype)
    tx = make_optimizer(train)
    params = jax.jit(model.init)(jax.random.key(config.seed), jnp.zeros((1, seq), jnp.int32))["params"]
    opt_state = tx.init(params)
    batches = [jnp.asarray(dataset.train_batch(i, train.batch_size, seq)) for i in range(distinct_batches)]

    t0 = time.perf_counter()
    step = make_step(model, tx).lower(params, opt_state, batches[0]).compile()
    compile_s = time.perf_counter() - t0

    def run(i):
        nonlocal params, opt_state
        params, opt_state, loss = step(params, opt_state, batches[i % distinct_batches])
        return loss

    timing, loss = time_steps(run, iters=iters, warmup=warmup)
    return {
        "device": jax.devices()[0].device_kind, "batch_size": train.batch_size, "seq_len": seq,
        "params": sum(x.size for x in jax.tree_util.tree_leaves(params)),
        "lookup_in_compute_dtype": lookup_in_compute_dtype, "compile_s": compile_s,
        **throughput(timing, model_cfg, train), "final_loss": float(loss),
    }


def compile_for(config, chip: str, lookup_in_compute_dtype: bool = False) -> str:
    """Compile the plain step for one `chip` (an H100) without one; the same report as
    `gpt_jax.plan --compile_for` gives for gpt_jax's own step."""
    from gpt_jax.plan import GIB, compile_target, step_work, vocab_for
    from kernels.platform import targeting

    devices, platform, _, _ = compile_target(chip, 1)
    with targeting(platform):
        model_cfg = GPTConfig.from_config(config, vocab_for(config) or None)
        _check_plain(model_cfg)
        model = PlainGPT(model_cfg, lookup_in_compute_dtype)
        tx = make_optimizer(config.train)
        sharding = jax.sharding.SingleDeviceSharding(devices[0])
        placed = lambda tree: jax.tree_util.tree_map(  # noqa: E731
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)
        seq = model_cfg.block_size
        params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]
        batch = jax.ShapeDtypeStruct((config.train.batch_size, seq + 1), jnp.int32, sharding=sharding)
        lowered = make_step(model, tx).trace(placed(params), placed(jax.eval_shape(tx.init, params)), batch).lower()
    compiled = lowered.compile()
    return "\n".join([f"plain step compiled for 1 x {chip} (not run)",
                      f"  temporaries                     {compiled.memory_analysis().temp_size_in_bytes / GIB:10.2f} GiB",
                      *step_work(compiled)])


def _define_flags(fv):
    define_timing_flags(fv)
    flags.DEFINE_bool("lookup_in_compute_dtype", False, "look the embeddings up in the compute dtype "
                      "(a bfloat16 scatter-add in the backward), as Flax's nn.Embed(dtype=...) does", flag_values=fv)
    flags.DEFINE_string("compile_for", None, "compile for this chip (h100) without one and report, instead of "
                        "timing", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.bench_plain", _define_flags)
    check_timing_flags(fv)
    if fv.compile_for:
        print(compile_for(fv.config, fv.compile_for, fv.lookup_in_compute_dtype))
        return
    r = benchmark(fv.config, iters=fv.iters, warmup=fv.warmup, lookup_in_compute_dtype=fv.lookup_in_compute_dtype)
    lookup = "compute dtype" if r["lookup_in_compute_dtype"] else "float32"
    print(f"{r['device']}: plain Flax step, {r['params'] / 1e6:.2f}M params, batch {r['batch_size']} x "
          f"{r['seq_len']}, embedding lookup in {lookup}; compile {r['compile_s']:.1f} s")
    print(timing_table(r))
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump(r, f, indent=2)


if __name__ == "__main__":
    main()
