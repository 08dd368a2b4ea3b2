"""GPT-2/GPT-3 as pure-function Flax Linen modules.

Pre-LN blocks, learned positional embeddings, GELU, tied input/output embeddings, optional biases,
N(0, 0.02) init with the residual projections scaled by 1/sqrt(2 * n_layer). Each layer has its
own attention pattern from the config's schedule (GPT-3 alternates dense and local_strided).
Every parameter carries logical axis names; sharding rules in the config map them to the mesh.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax import kv_cache
from gpt_jax.attention import attend, attend_with_dropout
from kernels.patterns import Pattern, from_name, lcm_multiple
from kernels.platform import target_platform

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    block_size: int
    n_layer: int
    n_head: int
    n_embd: int
    patterns: tuple[Pattern, ...]  # one per layer
    mlp_ratio: int = 4
    dropout: float = 0.0
    attn_dropout: float = 0.0
    use_bias: bool = True
    dtype: str = "bfloat16"
    param_dtype: str = "float32"
    remat: str = "none"
    attn_impl: str = "auto"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_config(cls, cfg, vocab_size: int | None = None) -> "GPTConfig":
        """Build from an experiment config; `vocab_size` is the tokenizer's when the config says 0."""
        m, a = cfg.model, cfg.attention
        vocab = m.vocab_size or vocab_size
        if not vocab:
            raise ValueError("model.vocab_size is 0 and no tokenizer vocabulary was given")
        vocab = -(-vocab // m.vocab_multiple) * m.vocab_multiple
        schedule = tuple(a.schedule)
        if not schedule:
            raise ValueError("attention.schedule is empty")
        patterns = tuple(
            from_name(schedule[i % len(schedule)], window=a.window, stride=a.stride, block=a.block, c=a.c)
            for i in range(m.n_layer))
        return cls(vocab_size=vocab, block_size=m.block_size, n_layer=m.n_layer, n_head=m.n_head,
                   n_embd=m.n_embd, patterns=patterns, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
                   attn_dropout=m.attn_dropout,
                   use_bias=m.use_bias, dtype=resolve_dtype(m.dtype), param_dtype=m.param_dtype, remat=m.remat,
                   attn_impl=a.impl)

    def validate(self) -> None:
        """Raise ValueError with a one-line reason if this model cannot be built."""
        if self.n_embd % self.n_head:
            raise ValueError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}")
        for pattern in set(self.patterns):
            pattern.check_heads(self.n_head)
        multiple = lcm_multiple(self.patterns)
        if self.block_size % multiple:
            raise ValueError(
                f"model.block_size={self.block_size} is not a multiple of {multiple}, which the attention "
                f"schedule ({', '.join(sorted({str(p) for p in self.patterns}))}) needs")
        for name in (self.dtype, self.param_dtype):
            if name not in DTYPES:
                raise ValueError(f"unknown dtype {name!r}; expected one of {tuple(DTYPES)}")
        for name, rate in (("dropout", self.dropout), ("attn_dropout", self.attn_dropout)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"model.{name} must be in [0, 1), got {rate}")
        if self.remat not in ("none", *REMAT_POLICIES):
            raise ValueError(f"model.remat must be none, full or dots, got {self.remat!r}")


def embed_tokens(table, tokens, dtype):
    """Rows of the embedding table, looked up in the table's dtype and then cast to `dtype`.

    The gradient of a lookup is a scatter-add of every occurrence of a token into its row. Done in
    bfloat16 (Flax's Embed casts the table first) it drops counts: 256 + 1 == 256 in bfloat16, and a
    character-level batch holds each token thousands of times. XLA:GPU also runs bfloat16
    scatter-adds as compare-and-swap loops, slow under that contention (openxla/xla#26371).
    """
    return jnp.take(table, tokens, axis=0).astype(dtype)


def resolve_dtype(name: str) -> str:
    """"auto" is bfloat16 on accelerators and float32 on CPU, where bfloat16 math is emulated and slow."""
    if name != "auto":
        return name
    return "float32" if target_platform() == "cpu" else "bfloat16"


def _init(std: float, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


def _zeros(axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def _layer_norm(cfg: GPTConfig, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=1e-5, use_bias=cfg.use_bias, dtype=DTYPES[cfg.dtype],
                        param_dtype=DTYPES[cfg.param_dtype], name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                        bias_init=_zeros(("embed",)))


class Linear(nn.Module):
    """y = x @ kernel + bias, contracting x's last `in_dims` axes; the kernel's axes are named.

    Written out (rather than nn.DenseGeneral) so the kernel is created in its final shape: its
    logical axes then line up with its dimensions from the start.
    """
    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel's dimensions (inputs, then features)
    std: float
    cfg: GPTConfig
    in_dims: int = 1

    @nn.compact
    def __call__(self, x):
        dtype, pdtype = DTYPES[self.cfg.dtype], DTYPES[self.cfg.param_dtype]
        shape = (*x.shape[-self.in_dims:], *self.features)
        kernel = self.param("kernel", _init(self.std, self.axes), shape, pdtype)
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.in_dims)
        if self.cfg.use_bias:
            bias = self.param("bias", _zeros(self.axes[self.in_dims:]), self.features, pdtype)
            y = y + bias.astype(dtype)
        return y


class CausalSelfAttention(nn.Module):
    cfg: GPTConfig
    pattern: Pattern

    @nn.compact
    def __call__(self, x, deterministic: bool, cache=None, lengths=None, pos=None):
        """Without a cache: attention over x [b, t, embd]. With one (see GPT.__call__): a prefill
        (lengths given) or a one-token decode step at positions pos; returns (y, cache)."""
        cfg = self.cfg
        qkv = Linear((3, cfg.n_head, cfg.head_dim), ("embed", "qkv", "heads", "kv"), 0.02, cfg, name="c_attn")(x)
        q, k, v = (nn.with_logical_constraint(qkv[:, :, i], ("act_batch", "act_length", "act_heads", "kv"))
                   for i in range(3))
        if cache is not None and lengths is None:  # decode step: one token per row
            y, cache = kv_cache.decode_layer(self.pattern, cache, q[:, 0], k[:, 0], v[:, 0], pos)
            y = y[:, None]
        else:
            if cfg.attn_dropout > 0 and not deterministic:
                y = attend_with_dropout(q, k, v, self.pattern, cfg.attn_dropout, self.make_rng("dropout"),
                                        cfg.attn_impl)
            else:
                y = attend(q, k, v, self.pattern, cfg.attn_impl)
            if cache is not None:
                cache = kv_cache.prefill_layer(self.pattern, cache, k, v, lengths)
        y = Linear((cfg.n_embd,), ("heads", "kv", "embed"), 0.02 / math.sqrt(2 * cfg.n_layer), cfg,
                   in_dims=2, name="c_proj")(y)
        y = nn.Dropout(cfg.dropout)(y, deterministic=deterministic)
        return y if cache is None else (y, cache)


class MLP(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.cfg
        h = Linear((cfg.mlp_ratio * cfg.n_embd,), ("embed", "mlp"), 0.02, cfg, name="c_fc")(x)
        h = nn.with_logical_constraint(nn.gelu(h, approximate=True), ("act_batch", "act_length", "act_mlp"))
        y = Linear((cfg.n_embd,), ("mlp", "embed"), 0.02 / math.sqrt(2 * cfg.n_layer), cfg, name="c_proj")(h)
        return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
    cfg: GPTConfig
    pattern: Pattern

    @nn.compact
    def __call__(self, x, deterministic: bool, cache=None, lengths=None, pos=None):
        attn = CausalSelfAttention(self.cfg, self.pattern, name="attn")
        h = _layer_norm(self.cfg, "ln_1")(x)
        if cache is None:
            x = x + attn(h, deterministic)
        else:
            y, cache = attn(h, deterministic, cache, lengths, pos)
            x = x + y
        x = x + MLP(self.cfg, name="mlp")(_layer_norm(self.cfg, "ln_2")(x), deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))
        return x if cache is None else (x, cache)


class GPT(nn.Module):
    cfg: GPTConfig

    @nn.compact
    def __call__(self, tokens, deterministic: bool = True, return_hidden: bool = False, *, cache=None,
                 lengths=None):
        """tokens [batch, seq] int32 -> logits [batch, seq, vocab] in the compute dtype.

        With return_hidden, also the final LayerNorm's output [batch, seq, embd] (for reward and
        value heads).

        Cached decoding (gpt_jax.generate drives it; `cache` comes from `init_cache`):
        - prefill, `lengths` [batch] given: tokens [batch, seq] are right-padded prompts starting at
          position 0, row b's first lengths[b] real; seq must be a multiple of the schedule's
          sequence multiple. Returns (logits [batch, vocab] at each row's last prompt token, cache).
        - decode step, `lengths` None: tokens [batch, 1], row b at position cache["pos"][b].
          Returns (logits [batch, vocab], cache) with every row's position advanced by one.
        Same parameters either way; return_hidden adds the hidden state at the same positions.
        """
        cfg = self.cfg
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        _, seq = tokens.shape
        wte = nn.Embed(cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype,
                       embedding_init=_init(0.02, ("vocab", "embed")), name="wte")
        wpe = self.param("wpe", _init(0.02, ("positions", "embed")), (cfg.block_size, cfg.n_embd), pdtype)
        tok = embed_tokens(wte.embedding, tokens, dtype)
        if cache is not None and lengths is None:
            x = tok + wpe[cache["pos"]][:, None].astype(dtype)
        else:
            x = tok + wpe[:seq].astype(dtype)
        x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, ("act_batch", "act_length", "act_embed"))

        block_cls = Block
        if cfg.remat != "none" and cache is None:
            # static_argnums counts self as 0: `deterministic` is argument 2.
            block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], static_argnums=(2,))
        layer_caches = []
        for i, pattern in enumerate(cfg.patterns):
            if cache is None:
                x = block_cls(cfg, pattern, name=f"h_{i}")(x, deterministic)
            else:
                x, c = block_cls(cfg, pattern, name=f"h_{i}")(x, deterministic, cache["layers"][i], lengths,
                                                              cache["pos"])
                layer_caches.append(c)

        if cache is not None:  # only the positions whose next token is wanted
            last = (lengths - 1) if lengths is not None else jnp.zeros_like(cache["pos"])
            x = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
        x = _layer_norm(cfg, "ln_f")(x)
        logits = wte.attend(x)  # tied
        if cache is None:
            logits = nn.with_logical_constraint(logits, ("act_batch", "act_length", "act_vocab"))
            return (logits, x) if return_hidden else logits
        new_cache = {"pos": lengths.astype(jnp.int32) if lengths is not None else cache["pos"] + 1,
                     "layers": tuple(layer_caches)}
        return ((logits, x) if return_hidden else logits), new_cache


def init_cache(cfg: GPTConfig, batch: int) -> dict:
    """An empty decode cache for `batch` rows: every layer's keys/values laid out for its pattern
    (gpt_jax/kv_cache.py) and each row's next position."""
    dtype = DTYPES[cfg.dtype]
    return {"pos": jnp.zeros((batch,), jnp.int32),
            "layers": tuple(kv_cache.init_layer(p, batch, cfg.block_size, cfg.n_head, cfg.head_dim, dtype)
                            for p in cfg.patterns)}


def count_params(params) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(params))
