"""Causal attention patterns: which keys j a query i may see (0-indexed, d = i - j).

- dense:                 0 <= d
- local(window):         0 <= d < window
- strided(stride):       0 <= d and d % stride == 0
- local_strided(w, s):   the union of local(w) and strided(s) (GPT-3 / Sparse Transformer)
- fixed(block, c):       0 <= d and (same block, or j % block >= block - c) (Sparse Transformer "fixed")
- heads(p1, p2, ...):    per-head patterns: the heads split into equal contiguous groups, group g uses
                         p_g (the Sparse Transformer's "multi-head" integration; "local/strided" by name)

A Pattern is a small frozen dataclass: hashable, so it can be a static argument of jitted
functions and a field of Flax modules.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("dense", "local", "strided", "local_strided", "fixed", "heads")


@dataclasses.dataclass(frozen=True)
class Pattern:
    kind: str
    window: int = 0
    stride: int = 0
    block: int = 0
    c: int = 0
    parts: tuple["Pattern", ...] = ()  # heads: one pattern per head group

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown attention pattern {self.kind!r}; expected one of {KINDS}")
        if self.kind in ("local", "local_strided") and self.window < 1:
            raise ValueError(f"pattern {self.kind} needs window >= 1, got {self.window}")
        if self.kind in ("strided", "local_strided") and self.stride < 1:
            raise ValueError(f"pattern {self.kind} needs stride >= 1, got {self.stride}")
        if self.kind == "fixed" and not (self.block >= 1 and 1 <= self.c <= self.block):
            raise ValueError(f"pattern fixed needs block >= 1 and 1 <= c <= block, got block={self.block}, c={self.c}")
        if self.kind == "heads" and (len(self.parts) < 2 or any(p.kind == "heads" for p in self.parts)):
            raise ValueError(f"per-head patterns need two or more patterns that are not per-head themselves, "
                             f"got {len(self.parts)}")

    @property
    def is_dense(self) -> bool:
        return self.kind == "dense"

    @property
    def seq_multiple(self) -> int:
        """Sequence lengths must be a multiple of this (the residue layout of the fast kernels needs it)."""
        if self.kind in ("strided", "local_strided"):
            return self.stride
        if self.kind == "fixed":
            return self.block
        if self.kind == "heads":
            return lcm_multiple(self.parts)
        return 1

    def check_heads(self, heads: int, kv_heads: int | None = None) -> None:
        """Per-head patterns split the query heads (and kv heads) into len(parts) equal groups."""
        n = len(self.parts)
        if self.kind == "heads" and (heads % n or (kv_heads or n) % n):
            raise ValueError(f"{self} splits the heads into {n} groups, which needs the number of heads "
                             f"({heads}{'' if kv_heads is None else f', kv heads {kv_heads}'}) to be a multiple of {n}")

    def check_seq_len(self, seq_len: int) -> None:
        m = self.seq_multiple
        if seq_len % m:
            raise ValueError(
                f"sequence length {seq_len} is not a multiple of {m}, which pattern {self} needs; "
                f"use a length that is a multiple of {m}")

    def visible(self, i, j):
        """Whether query position i sees key position j, elementwise over broadcastable integer arrays.
        Only operators are used, so numpy, jax (inside kernels too) and torch arrays all work: the
        masks of the reference, of splash attention and of FlexAttention are this one definition."""
        if self.kind == "heads":
            raise ValueError(f"{self} has one mask per head group; take each part's mask")
        d = i - j
        causal = d >= 0
        if self.kind == "dense":
            return causal
        if self.kind == "local":
            return causal & (d < self.window)
        if self.kind == "strided":
            return causal & (d % self.stride == 0)
        if self.kind == "local_strided":
            return causal & ((d < self.window) | (d % self.stride == 0))
        same_block = (i // self.block) == (j // self.block)
        summary = (j % self.block) >= (self.block - self.c)
        return causal & (same_block | summary)

    def mask(self, q_pos, k_pos, xp=np):
        """Boolean mask [Tq, Tk] for query positions q_pos [Tq] and key positions k_pos [Tk] (numpy or
        jax arrays; `xp` is kept for callers that name the array module). Per-head patterns have one
        mask per head group: use `parts`."""
        return self.visible(q_pos[:, None], k_pos[None, :])

    def keys_per_row(self, i: int) -> float:
        """Number of keys query i attends to, by formula (tests check it against the mask); for per-head
        patterns the mean over the head groups."""
        if self.kind == "heads":
            return sum(p.keys_per_row(i) for p in self.parts) / len(self.parts)
        if self.kind == "dense":
            return i + 1
        if self.kind == "local":
            return min(i + 1, self.window)
        if self.kind == "strided":
            return i // self.stride + 1
        if self.kind == "local_strided":
            near = min(i + 1, self.window)
            # strided offsets d = 0, s, 2s, ... <= i; those with d < window are already in the band
            strided_total = i // self.stride + 1
            strided_in_band = (min(i, self.window - 1)) // self.stride + 1
            return near + strided_total - strided_in_band
        # fixed: own block up to i, plus summary columns of earlier blocks
        b, c = self.block, self.c
        own = i % b + 1
        earlier_blocks = i // b
        return own + earlier_blocks * c

    def pairs(self, seq_len: int) -> float:
        """(query, key) pairs one head computes over a causal sequence of seq_len (per-head patterns: the
        mean over head groups)."""
        if self.kind == "heads":
            return sum(p.pairs(seq_len) for p in self.parts) / len(self.parts)
        return sum(self.keys_per_row(i) for i in range(seq_len))

    def density(self, seq_len: int) -> float:
        """Share of the causal pairs that the pattern computes."""
        return self.pairs(seq_len) / (seq_len * (seq_len + 1) / 2)

    def __str__(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "local":
            return f"local(window={self.window})"
        if self.kind == "strided":
            return f"strided(stride={self.stride})"
        if self.kind == "local_strided":
            return f"local_strided(window={self.window}, stride={self.stride})"
        if self.kind == "heads":
            return "heads(" + " | ".join(str(p) for p in self.parts) + ")"
        return f"fixed(block={self.block}, c={self.c})"


def dense() -> Pattern:
    return Pattern("dense")


def local(window: int) -> Pattern:
    return Pattern("local", window=window)


def strided(stride: int) -> Pattern:
    return Pattern("strided", stride=stride)


def local_strided(window: int, stride: int) -> Pattern:
    return Pattern("local_strided", window=window, stride=stride)


def fixed(block: int, c: int) -> Pattern:
    return Pattern("fixed", block=block, c=c)


def heads(*parts: Pattern) -> Pattern:
    return Pattern("heads", parts=tuple(parts))


def from_name(name: str, *, window: int = 0, stride: int = 0, block: int = 0, c: int = 0) -> Pattern:
    """Build a pattern from a schedule entry such as "local_strided", taking sizes from the config;
    "local/strided" gives each half of the heads its own pattern (per-head patterns)."""
    if "/" in name:
        return heads(*(from_name(part.strip(), window=window, stride=stride, block=block, c=c)
                       for part in name.split("/")))
    params = {"dense": {}, "local": dict(window=window), "strided": dict(stride=stride),
              "local_strided": dict(window=window, stride=stride), "fixed": dict(block=block, c=c)}
    if name not in params:
        raise ValueError(f"unknown attention pattern {name!r}; expected one of {KINDS}")
    return Pattern(name, **params[name])


def lcm_multiple(patterns) -> int:
    """The sequence multiple that every pattern in a schedule accepts."""
    m = 1
    for p in patterns:
        m = math.lcm(m, p.seq_multiple)
    return m
