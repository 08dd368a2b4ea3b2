"""Text data: documents -> one packed token stream per source -> random windows indexed by step.

A source is the embedded corpus ("stdlib": this interpreter's standard library sources), a text file
or a folder of text files. Its documents are packed into one stream, each followed by EOT; the first
(1 - val_fraction) of the stream is train, the rest val (nanoGPT). Sources mix by weight, as in
GPT-3 Table 2.2: the weight, not the size, decides how often a source is drawn.

Batches are a pure function of (seed, step), as in Levanter: a resumed run sees exactly the batch it
would have seen, and the checkpoint's "iterator position" is just the step. `train_batch` returns
the global batch; under multi-host training each process slices its own rows.
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.tokenizer import KINDS, Tokenizer, build_tokenizer, load_tokenizer, save_tokenizer

STDLIB = "stdlib"
ARITH = "arith"  # generated GPT-3-style arithmetic worksheets (gpt_jax/tasks.py)
WORDTASKS = "wordtasks"  # generated blocks of word-scrambling examples (gpt_jax/tasks.py)
WORDPUZZLES = "wordpuzzles"  # the same, each block's answers in lowercase or Capitalized (gpt_jax/tasks.py)
# Test suites are two thirds of the stdlib (31.7 MB with them, Python 3.12.1) and mostly repetitive
# fixtures; without them the corpus is 686 files, 11.6 MB: the "about 11 MB" of the design notes.
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_CACHE_VERSION = "1"  # bump when the cached stream format changes


# ----------------------------------------------------------------------------- documents


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, suffix: str, skip_dir) -> list[Path]:
    """Files under root ending in `suffix`, sorted; folders where skip_dir(name) are not entered."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not skip_dir(d)]  # prune: never descend
        out += [Path(dirpath, f) for f in filenames if f.endswith(suffix)]
    return sorted(out)


def _source_files(path: str) -> tuple[Path, list[Path]]:
    """(root, candidate files, sorted) of a source; the files are not yet checked to be text."""
    if path in ("", STDLIB):
        root = _stdlib_root()
        return root, _walk(root, ".py", lambda d: d in _STDLIB_SKIP_DIRS)
    if path in (ARITH, WORDTASKS, WORDPUZZLES):  # the generator's source file names (and so invalidates) the cached stream
        from gpt_jax import tasks
        extra = [Path(__file__)] if path != ARITH else []  # (the words come from the corpus loader)
        return Path(tasks.__file__), [Path(tasks.__file__), *extra]
    root = Path(os.path.expanduser(path))
    if not root.exists():
        raise UserError(f"data path does not exist: {path}")
    if root.is_file():
        return root, [root]
    # Hidden files and folders (.git, .venv, ...) are tooling, not the user's text.
    files = _walk(root, "", lambda d: d.startswith("."))
    return root, [p for p in files if not p.name.startswith(".")]


def _read_text(p: Path) -> str | None:
    """The file's text, or None when it is not text (NUL bytes, not UTF-8) or has none."""
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {p}: {e.strerror}") from None
    if b"\x00" in data:
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def load_documents(path: str) -> list[str]:
    """The documents of one source: "" or "stdlib" for the embedded corpus, "arith" for generated
    arithmetic, a file, or a folder."""
    if path == ARITH:
        from gpt_jax.tasks import arithmetic_documents
        return arithmetic_documents()
    if path in (WORDTASKS, WORDPUZZLES):
        from gpt_jax.tasks import PUZZLE_ANSWER_STYLES, scramble_documents
        return scramble_documents(answer_styles=PUZZLE_ANSWER_STYLES if path == WORDPUZZLES else ("lower",))
    root, files = _source_files(path)
    if root.is_file():
        text = _read_text(root)
        if text is None:
            raise UserError(f"no text found in {path}: the file is empty or not UTF-8 text")
        return [text]
    docs = [t for t in map(_read_text, files) if t is not None]
    if not docs:
        raise UserError(f"no text found under {path or STDLIB}: no non-empty UTF-8 text files")
    return docs


# ----------------------------------------------------------------------------- mixtures


@dataclass(frozen=True)
class SourceSpec:
    name: str  # as the user wrote it; "stdlib" for the embedded corpus
    path: str
    weight: float


def parse_mixture(spec: str) -> list[SourceSpec]:
    """"stdlib:0.6,/data/a.txt:0.3,/data/dir:0.1" -> sources; an entry without ":weight" weighs 1."""
    out: list[SourceSpec] = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise UserError(f"bad data mixture {spec!r}: empty entry (expected source:weight,...)")
        path, sep, w = item.rpartition(":")
        weight = 1.0
        if not sep or "/" in w:  # no weight given (or the colon was part of the path)
            path = item
        else:
            try:
                weight = float(w)
            except ValueError:
                msg = f"bad data mixture {spec!r}: weight {w!r} of {path!r} is not a number"
                raise UserError(msg) from None
        path = path.strip()
        if not path:
            raise UserError(f"bad data mixture {spec!r}: entry {item!r} has no source")
        if not (math.isfinite(weight) and weight > 0):
            raise UserError(f"bad data mixture {spec!r}: weight of {path!r} must be a positive number")
        if any(s.name == path for s in out):
            raise UserError(f"bad data mixture {spec!r}: {path!r} is listed twice")
        out.append(SourceSpec(path, path, weight))
    return out


# ----------------------------------------------------------------------------- dataset


@dataclass
class Source:
    name: str
    train: np.ndarray  # token ids (uint16/uint32, possibly memory-mapped)
    val: np.ndarray
    weight: float  # normalized: the weights of a dataset's sources sum to 1


class Dataset:
    """Token streams of one or more weighted sources, sampled as random windows by step."""

    def __init__(self, tokenizer: Tokenizer, sources: list[Source], seed: int):
        if seed < 0:
            raise UserError(f"seed must be >= 0, got {seed}")
        total = sum(s.weight for s in sources)
        self.tokenizer = tokenizer
        self.sources = [Source(s.name, s.train, s.val, s.weight / total) for s in sources]
        self.seed = int(seed)
        self._p = np.array([s.weight for s in self.sources])

    def train_batch(self, step: int, batch_size: int, seq_len: int) -> np.ndarray:
        """int32 [batch_size, seq_len + 1] windows of the train splits; inputs are [:, :-1],
        targets [:, 1:]. Depends only on (seed, step)."""
        return self._batch("train", 0, step, batch_size, seq_len)

    def val_batch(self, index: int, batch_size: int, seq_len: int) -> np.ndarray:
        """Same from the val splits; depends only on (seed, index), a stream apart from train's."""
        return self._batch("val", 1, index, batch_size, seq_len)

    def check_seq_len(self, seq_len: int, split: str = "train") -> None:
        """UserError unless every source's split holds at least one window of seq_len + 1."""
        for s in self.sources:
            n = len(getattr(s, split))
            if n < seq_len + 1:
                raise UserError(
                    f"data source {s.name}: its {split} split has {n} tokens, fewer than "
                    f"seq_len + 1 = {seq_len + 1}; use more text, a shorter seq_len or "
                    "another val_fraction"
                )

    def _batch(self, split: str, stream: int, index: int, batch_size: int, seq_len: int) -> np.ndarray:
        self.check_seq_len(seq_len, split)
        # A fresh generator per (seed, stream, index): no state, so call order cannot matter.
        rng = np.random.default_rng((self.seed, stream, int(index)))
        arrays = [getattr(s, split) for s in self.sources]
        which = rng.choice(len(arrays), size=batch_size, p=self._p)
        highs = np.array([len(a) - seq_len for a in arrays])[which]  # offsets in [0, n - seq_len - 1]
        offsets = rng.integers(0, highs)
        rows = [arrays[w][o : o + seq_len + 1] for w, o in zip(which.tolist(), offsets.tolist())]
        return np.stack(rows).astype(np.int32)

    def epochs_report(self, train_tokens_total: int) -> list[dict]:
        """Per source: how many passes over its train split `train_tokens_total` tokens make."""
        return [
            {
                "name": s.name,
                "train_tokens": len(s.train),
                "weight": s.weight,
                "epochs": train_tokens_total * s.weight / len(s.train) if len(s.train) else math.inf,
            }
            for s in self.sources
        ]


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_epochs_report(report: list[dict], train_tokens_total: int) -> str:
    """GPT-3 Table 2.2-style lines: source, tokens, weight in the mix, epochs over the run."""
    width = max([len("source")] + [len(r["name"]) for r in report])
    lines = [
        f"data mix for {_human(train_tokens_total)} training tokens:",
        f"  {'source':<{width}}  {'tokens':>8}  {'weight':>7}  {'epochs':>8}",
    ]
    for r in report:
        lines.append(
            f"  {r['name']:<{width}}  {_human(r['train_tokens']):>8}  "
            f"{100 * r['weight']:>6.1f}%  {r['epochs']:>8.3f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- building


def _token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _pack(docs: list[str], tok: Tokenizer) -> np.ndarray:
    """One stream: doc0 EOT doc1 EOT ... (every document followed by EOT)."""
    dtype = _token_dtype(tok.vocab_size)
    eot = np.array([tok.eot_id], dtype=dtype)
    parts: list[np.ndarray] = []
    for ids in tok.encode_batch(docs):
        parts += [ids.astype(dtype), eot]
    return np.concatenate(parts)


def _cache_path(workdir: str, root: Path, files: list[Path], tok: Tokenizer) -> str:
    """Named by what the stream depends on: the files (path, size, mtime) and the tokenizer."""
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{root.resolve()}|{tok.fingerprint()}".encode())
    for p in files:
        st = p.stat()
        h.update(f"|{p}|{st.st_size}|{st.st_mtime_ns}".encode())
    return os.path.join(workdir, "data_cache", f"{h.hexdigest()[:24]}.npy")


def _save_npy(path: str, arr: np.ndarray) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:  # a file object, so np.save does not append ".npy"
        np.save(f, arr)
    os.replace(tmp, path)  # atomic: a killed run never leaves a truncated cache


def _train_prefix(docs: list[str], val_fraction: float) -> list[str]:
    """The first (1 - val_fraction) of the documents' characters: roughly the train split."""
    keep = int(sum(len(d) for d in docs) * (1 - val_fraction))
    out = []
    for d in docs:
        if keep <= 0:
            break
        out.append(d[:keep])
        keep -= len(d)
    return out


def build_dataset(data_cfg, workdir: str | None, seed: int) -> Dataset:
    """The Dataset `data_cfg` describes (fields: path, mixture, tokenizer, bpe_vocab_size,
    val_fraction). The tokenizer and the token streams are kept in `workdir` when it is given."""
    kind = data_cfg.get("tokenizer", "byte")
    if kind not in KINDS:
        raise UserError(f"unknown tokenizer {kind!r}: expected one of {', '.join(KINDS)}")
    bpe_vocab_size = int(data_cfg.get("bpe_vocab_size", 0))
    val_fraction = float(data_cfg.get("val_fraction", 0.1))
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    mixture = data_cfg.get("mixture", "")
    if mixture:
        specs = parse_mixture(mixture)
    else:
        path = data_cfg.get("path", "")
        specs = [SourceSpec(STDLIB if path in ("", STDLIB) else path, path, 1.0)]

    tok = load_tokenizer(workdir) if workdir else None
    if tok is not None:
        if tok.kind != kind:
            raise UserError(
                f"workdir {workdir} was made with a {tok.kind} tokenizer but the config asks for "
                f"{kind}; use a new workdir or data.tokenizer={tok.kind}"
            )
        if kind == "bpe" and tok.target_vocab_size != bpe_vocab_size:
            raise UserError(
                f"workdir {workdir} was made with bpe_vocab_size={tok.target_vocab_size} but the "
                f"config asks for {bpe_vocab_size}; use a new workdir or the same size"
            )

    docs: dict[str, list[str]] = {}  # read once, only when a tokenizer or a stream needs them
    if tok is None:
        texts: list[str] = []
        if kind != "byte":
            for s in specs:
                docs[s.name] = load_documents(s.path)
                # char: the whole text, so no val character is unseen (nanoGPT); bpe: the train part.
                texts += docs[s.name] if kind == "char" else _train_prefix(docs[s.name], val_fraction)
        tok = build_tokenizer(kind, texts, bpe_vocab_size)
        if workdir:
            save_tokenizer(tok, workdir)

    sources = []
    for s in specs:
        root, files = _source_files(s.path)
        cache = _cache_path(workdir, root, files, tok) if workdir else None
        if cache and os.path.exists(cache):
            stream = np.load(cache, mmap_mode="r")
        else:
            stream = _pack(docs[s.name] if s.name in docs else load_documents(s.path), tok)
            if cache:
                _save_npy(cache, stream)
                stream = np.load(cache, mmap_mode="r")
        n_train = int(len(stream) * (1 - val_fraction))
        sources.append(Source(s.name, stream[:n_train], stream[n_train:], s.weight))
    return Dataset(tok, sources, seed)
