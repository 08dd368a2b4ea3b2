"""Tokenizers: byte-level (the default), character-level (nanoGPT shakespeare_char) and BPE.

All three share one small interface (`vocab_size`, `eot_id`, `encode`, `decode`, `kind`) and are
saved to `workdir/tokenizer.json`, so a resumed run, the sampler and the evaluator read text the
same way the training run did.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterable, Sequence

import numpy as np

from gpt_jax.errors import UserError

EOT_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("byte", "char", "bpe")

# BPE merges are learned from at most this many characters, taken as evenly spaced slices of the
# training text: ~1 s for 8M characters on one core, and more text barely changes the merges.
BPE_SAMPLE_CHARS = 8_000_000
_BPE_SLICE_CHARS = 1 << 16


class Tokenizer:
    """Common interface. Subclasses set `kind`, `vocab_size`, `eot_id` and implement the rest."""

    kind: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 ids. Never produces `eot_id`: EOT is only inserted between documents."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        """Ids -> text; never raises. Ids outside [0, vocab_size) (e.g. a padded model vocab)
        become U+FFFD, EOT becomes "<|endoftext|>"."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        valid = (ids >= 0) & (ids < self.vocab_size)
        if valid.all():
            return self._decode_valid(ids)
        # Decode each run of in-range ids on its own so a stray id cannot break a multi-byte char.
        parts, start = [], 0
        for i in np.flatnonzero(~valid):
            parts += [self._decode_valid(ids[start:i]), "\ufffd"]
            start = i + 1
        parts.append(self._decode_valid(ids[start:]))
        return "".join(parts)

    def _decode_valid(self, ids: np.ndarray) -> str:
        raise NotImplementedError

    def to_json(self) -> dict:
        """What save_tokenizer writes; must include "kind"."""
        raise NotImplementedError

    def fingerprint(self) -> str:
        """Hash of the saved form: names the token caches built with this tokenizer."""
        blob = json.dumps(self.to_json(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _split_on_eot(ids: np.ndarray, eot_id: int) -> list[np.ndarray | None]:
    """[a, b, EOT, c] -> [array([a, b]), None, array([c])]: None marks each EOT."""
    out: list[np.ndarray | None] = []
    start = 0
    for i in np.flatnonzero(ids == eot_id):
        out += [ids[start:i], None]
        start = i + 1
    out.append(ids[start:])
    return out


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 plus EOT = 256: no training, nothing unknown, vocab 257."""

    kind = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> np.ndarray:
        # np.frombuffer instead of a Python loop: the 11 MB stdlib corpus takes milliseconds.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def _decode_valid(self, ids: np.ndarray) -> str:
        return "".join(
            EOT_TEXT if part is None else part.astype(np.uint8).tobytes().decode(errors="replace")
            for part in _split_on_eot(ids, self.eot_id)
        )

    def to_json(self) -> dict:
        return {"kind": self.kind}


class CharTokenizer(Tokenizer):
    """One id per character of a fixed alphabet (sorted), EOT as the last id."""

    kind = "char"

    def __init__(self, alphabet: str):
        chars = sorted(set(alphabet))
        if not chars:
            raise UserError("char tokenizer: no text to build the alphabet from")
        self.alphabet = "".join(chars)
        self.vocab_size = len(chars) + 1
        self.eot_id = len(chars)
        self._codes = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted code points

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> "CharTokenizer":
        seen: set[str] = set()
        for t in texts:
            seen.update(t)
        return cls("".join(seen))

    def encode(self, text: str) -> np.ndarray:
        # Vectorized lookup: code points via UTF-32, then binary search in the sorted alphabet.
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codes, cps)
        ok = ids < len(self._codes)
        ok[ok] = self._codes[ids[ok]] == cps[ok]
        if not ok.all():
            bad = chr(int(cps[np.argmin(ok)]))
            raise UserError(
                f"character {bad!r} is not in the char tokenizer's alphabet "
                f"({len(self.alphabet)} characters from the training text)"
            )
        return ids.astype(np.int32)

    def _decode_valid(self, ids: np.ndarray) -> str:
        return "".join(EOT_TEXT if i == self.eot_id else self.alphabet[i] for i in ids.tolist())

    def to_json(self) -> dict:
        return {"kind": self.kind, "alphabet": self.alphabet}


class BPETokenizer(Tokenizer):
    """GPT-2-style byte-level BPE trained with the `tokenizers` package."""

    kind = "bpe"

    def __init__(self, tok, target_vocab_size: int):
        # The literal text "<|endoftext|>" inside a document stays text, as in the other tokenizers.
        tok.encode_special_tokens = True
        self._tok = tok
        self.target_vocab_size = target_vocab_size
        self.vocab_size = tok.get_vocab_size()  # can be below the target on a small text
        self.eot_id = tok.token_to_id(EOT_TEXT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257:
            raise UserError(f"bpe_vocab_size must be at least 257 (256 bytes + EOT), got {vocab_size}")
        sample = _sample_text(list(texts), BPE_SAMPLE_CHARS)
        if not any(sample):
            raise UserError("bpe tokenizer: no text to train on")
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT_TEXT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable
            show_progress=False,
        )
        tok.train_from_iterator(sample, trainer)
        return cls(tok, vocab_size)

    def encode(self, text: str) -> np.ndarray:
        return np.array(self._tok.encode(text).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        # encode_batch runs in parallel in Rust.
        return [np.array(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def _decode_valid(self, ids: np.ndarray) -> str:
        return self._tok.decode(ids.tolist(), skip_special_tokens=False)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "target_vocab_size": self.target_vocab_size,
            "tokenizer": json.loads(self._tok.to_str()),
        }


def _sample_text(texts: list[str], cap: int) -> list[str]:
    """All of `texts` if small, else ~cap characters as evenly spaced slices of their concatenation."""
    total = sum(len(t) for t in texts)
    if total <= cap:
        return texts
    joined = "\n".join(texts)
    n = max(1, cap // _BPE_SLICE_CHARS)
    starts = np.linspace(0, len(joined) - _BPE_SLICE_CHARS, n).astype(np.int64)
    return [joined[s : s + _BPE_SLICE_CHARS] for s in starts]


def build_tokenizer(kind: str, texts: Iterable[str], bpe_vocab_size: int) -> Tokenizer:
    """A fresh tokenizer of `kind`; char and bpe learn from `texts`, byte ignores them."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer.from_texts(texts)
    if kind == "bpe":
        return BPETokenizer.train(texts, bpe_vocab_size)
    raise UserError(f"unknown tokenizer {kind!r}: expected one of {', '.join(KINDS)}")


def tokenizer_from_json(d: dict) -> Tokenizer:
    kind = d.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(d["alphabet"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(json.dumps(d["tokenizer"])), d["target_vocab_size"])
    raise UserError(f"unknown tokenizer kind {kind!r} in saved tokenizer")


def save_tokenizer(tok: Tokenizer, workdir: str) -> str:
    """Write workdir/tokenizer.json (atomically: a killed run never leaves half a file)."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, TOKENIZER_FILE)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(tok.to_json(), f, ensure_ascii=False)
    os.replace(tmp, path)
    return path


def load_tokenizer(workdir: str) -> Tokenizer | None:
    """The tokenizer saved in `workdir`, or None if there is none."""
    path = os.path.join(workdir, TOKENIZER_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return tokenizer_from_json(json.load(f))
    except UserError:
        raise
    except Exception as e:  # bad JSON, missing keys, or `tokenizers` refusing its part

        raise UserError(f"{path} is not a valid saved tokenizer ({type(e).__name__}: {e})") from None
