"""Generation speed: tokens/s of cached decoding (gpt_jax.generate) against uncached decoding (a full
forward pass over the context for every new token), with random weights.

    python -m gpt_jax.bench_generate --config experiments/gpt3_small.py --batch 1,32 --new-tokens 1024 \
        [--prompt-len 16] [--uncached 0|1] [--out bench_generate.json] [--config.<key>=<value>]

Both paths are compiled once and timed after a warm-up call; both run their token loop inside one
`jax.lax` loop, so the comparison is the cost of a step, not Python overhead. Decoding is greedy, and
the report says how many tokens the two paths agree on (bf16 rounding may flip a near tie, after which
the rows differ) and, teacher-forced, whether a full forward pass over the cached path's own output
would have chosen the same tokens, and by what logit margin it disagrees where it does not.
"""

from __future__ import annotations

import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import cli
from gpt_jax.errors import UserError, cli_entry
from gpt_jax.generate import generate
from gpt_jax.model import GPT, GPTConfig


def uncached_generate(model_cfg: GPTConfig, params, prompt: np.ndarray, max_new_tokens: int) -> np.ndarray:
    """Greedy decoding that reruns the model over a fixed [batch, block_size] window every step."""
    model = GPT(model_cfg)
    batch, plen = prompt.shape

    @jax.jit
    def run(params, prompt):
        window = jnp.zeros((batch, model_cfg.block_size), jnp.int32).at[:, :plen].set(prompt)

        def step(window, i):
            logits = model.apply({"params": params}, window)[:, plen + i - 1]
            token = jnp.argmax(logits.astype(jnp.float32), axis=-1).astype(jnp.int32)
            return window.at[:, plen + i].set(token), token

        _, tokens = jax.lax.scan(step, window, jnp.arange(max_new_tokens))
        return tokens.T

    return run, (params, prompt)


def teacher_forced_check(model_cfg: GPTConfig, params, prompt: np.ndarray, tokens: np.ndarray) -> dict:
    """Score the cached path's tokens with one full forward pass over prompt + tokens.

    Free-running agreement with uncached decoding says little once a near tie flips: the two rows
    then continue from different text. Here every generated position is judged on the cached path's
    own context: `forced_agreement` is how often the full pass's argmax is the token the cache chose,
    and `max_gap` the largest logit margin by which the full pass preferred another token (near zero
    for rounding, large for a wrong cache).
    """
    batch, plen = prompt.shape
    new = tokens.shape[1]
    window = np.zeros((batch, model_cfg.block_size), np.int32)
    window[:, :plen], window[:, plen:plen + new] = prompt, tokens
    logits = jax.jit(lambda p, w: GPT(model_cfg).apply({"params": p}, w))(params, window)
    logits = np.asarray(logits[:, plen - 1:plen + new - 1], np.float32)  # the position before each token
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    return {"forced_agreement": float(np.mean(logits.argmax(-1) == tokens)),
            "max_gap": float(np.max(logits.max(-1) - chosen))}


def _time(fn, *args, repeats: int = 2) -> tuple[float, np.ndarray]:
    out = jax.block_until_ready(fn(*args))  # compile and warm up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best, np.asarray(out)


def bench(model_cfg: GPTConfig, batches: list[int], new_tokens: int, prompt_len: int, uncached: bool) -> list[dict]:
    params = jax.jit(lambda k: GPT(model_cfg).init(k, jnp.zeros((1, model_cfg.block_size), jnp.int32))["params"])(
        jax.random.key(0))
    params = nn.unbox(params)
    rows = []
    for b in batches:
        prompt = np.asarray(jax.random.randint(jax.random.key(b), (b, prompt_len), 0, model_cfg.vocab_size), np.int32)
        prompts = prompt.tolist()

        def cached(params, _prompt):
            return generate(model_cfg, params, prompts, max_new_tokens=new_tokens, key=jax.random.key(0),
                            temperature=0.0).tokens

        seconds, tokens = _time(cached, params, prompt)
        row = {"batch": b, "new_tokens": new_tokens, "prompt_len": prompt_len, "cached_s": seconds,
               "cached_tokens_per_s": b * new_tokens / seconds,
               **teacher_forced_check(model_cfg, params, prompt, tokens)}
        if uncached:
            fn, args = uncached_generate(model_cfg, params, prompt, new_tokens)
            seconds_u, tokens_u = _time(fn, *args, repeats=1)
            row.update(uncached_s=seconds_u, uncached_tokens_per_s=b * new_tokens / seconds_u,
                       speedup=seconds_u / seconds, agreement=float(np.mean(tokens_u == tokens)))
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'batch':>5} {'new':>5} {'cached tok/s':>13} {'uncached tok/s':>15} {'speedup':>8} {'agree':>6} "
             f"{'forced':>7} {'max gap':>8}"]
    for r in rows:
        unc = f"{r['uncached_tokens_per_s']:15,.0f} {r['speedup']:7.1f}x {r['agreement']:6.3f}" if "speedup" in r \
            else f"{'-':>15} {'-':>8} {'-':>6}"
        lines.append(f"{r['batch']:5d} {r['new_tokens']:5d} {r['cached_tokens_per_s']:13,.0f} {unc} "
                     f"{r['forced_agreement']:7.3f} {r['max_gap']:8.4f}")
    lines.append("agree: tokens shared with uncached decoding; forced: the full forward pass's argmax on the "
                 "cached path's own context; max gap: its largest logit margin against the cached choice")
    return "\n".join(lines)


def _define_flags(fv):
    flags.DEFINE_string("batch", "1,32", "comma-separated batch sizes", flag_values=fv)
    flags.DEFINE_integer("new_tokens", 1024, "tokens to generate per row", flag_values=fv)
    flags.DEFINE_integer("prompt_len", 16, "prompt tokens per row (random ids)", flag_values=fv)
    flags.DEFINE_integer("uncached", 1, "1: also time uncached decoding; 0: cached only", flag_values=fv)
    flags.DEFINE_string("out", None, "write the rows as JSON here", flag_values=fv)


@cli_entry
def main(argv):
    fv = cli.parse(argv, "gpt_jax.bench_generate", _define_flags)
    try:
        batches = [int(b) for b in fv.batch.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"--batch must be comma-separated integers, got {fv.batch!r}") from None
    vocab = fv.config.model.vocab_size or 257
    try:
        model_cfg = GPTConfig.from_config(fv.config, vocab)
        model_cfg.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if fv.prompt_len < 1 or fv.prompt_len + fv.new_tokens > model_cfg.block_size:
        raise UserError(f"--prompt-len {fv.prompt_len} + --new-tokens {fv.new_tokens} must be within the context "
                        f"of {model_cfg.block_size}")
    print(f"device: {jax.devices()[0].device_kind}; model: {model_cfg.n_layer} layers x {model_cfg.n_embd}, "
          f"{model_cfg.dtype}, patterns {sorted({str(p) for p in model_cfg.patterns})}", file=sys.stderr)
    rows = bench(model_cfg, batches, fv.new_tokens, fv.prompt_len, bool(fv.uncached))
    print(format_table(rows))
    if fv.out:
        with open(fv.out, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
