"""Tokenizers, packing, step-indexed batches, mixtures and the data errors users can hit."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest

from gpt_jax import data
from gpt_jax.errors import UserError
from gpt_jax.tokenizer import (
    EOT_TEXT,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
)

TEXT = "def f(x):\n    return x + 1  # héllo, wörld ✓\n" * 20


def cfg(**kw):
    base = dict(path="", mixture="", tokenizer="byte", bpe_vocab_size=300, val_fraction=0.1)
    base.update(kw)
    return ml_collections.ConfigDict(base)


def write(path, content):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def stream_of(source):
    return np.concatenate([np.asarray(source.train), np.asarray(source.val)])


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.decode([104, 105, 256, 104]) == f"hi{EOT_TEXT}h"
    # Never raises: broken UTF-8 and out-of-range ids become U+FFFD.
    assert tok.decode([0xFF, 104]) == "\ufffdh"
    assert tok.decode([104, 999, -1]) == "h\ufffd\ufffd"


def test_char_tokenizer_round_trip_and_unseen_char():
    tok = CharTokenizer.from_texts(["hello", " world"])
    assert tok.alphabet == " dehlorw"
    assert (tok.vocab_size, tok.eot_id) == (9, 8)
    ids = tok.encode("hello world")
    assert ids.dtype == np.int32
    assert tok.decode(ids) == "hello world"
    assert tok.decode([*ids[:5], tok.eot_id]) == f"hello{EOT_TEXT}"
    with pytest.raises(UserError, match="'z'"):
        tok.encode("hello wz")


def test_bpe_tokenizer_round_trip():
    tok = build_tokenizer("bpe", [TEXT], bpe_vocab_size=300)
    assert isinstance(tok, BPETokenizer)
    assert 257 <= tok.vocab_size <= 300
    ids = tok.encode(TEXT)
    assert len(ids) < len(TEXT.encode()) / 2  # merges were learned
    assert tok.decode(ids) == TEXT
    unseen = "unseen: ∑ 日本"
    assert tok.decode(tok.encode(unseen)) == unseen  # byte-level: nothing is unknown
    assert tok.decode([*tok.encode("hi"), tok.eot_id]) == f"hi{EOT_TEXT}"
    # A literal "<|endoftext|>" inside a document is text, not EOT.
    assert tok.eot_id not in tok.encode(f"a{EOT_TEXT}b")


@pytest.mark.parametrize("kind", ["byte", "char", "bpe"])
def test_save_load_tokenizer(tmp_path, kind):
    assert load_tokenizer(str(tmp_path)) is None
    tok = build_tokenizer(kind, [TEXT], bpe_vocab_size=300)
    save_tokenizer(tok, str(tmp_path))
    back = load_tokenizer(str(tmp_path))
    assert (back.kind, back.vocab_size, back.eot_id) == (kind, tok.vocab_size, tok.eot_id)
    np.testing.assert_array_equal(back.encode(TEXT), tok.encode(TEXT))
    assert back.decode(back.encode(TEXT)) == TEXT
    assert back.fingerprint() == tok.fingerprint()


def test_unknown_tokenizer_kind():
    with pytest.raises(UserError, match="unknown tokenizer 'wordpiece'"):
        build_tokenizer("wordpiece", [TEXT], 300)


# ----------------------------------------------------------------------------- documents, packing


def test_folder_documents_sorted_and_binary_skipped(tmp_path):
    write(tmp_path / "b.txt", "second")
    write(tmp_path / "a" / "z.py", "first")
    write(tmp_path / "nul.bin", b"text\x00with nul")
    write(tmp_path / "latin1.txt", "caf\xe9".encode("latin-1"))  # not UTF-8
    write(tmp_path / "empty.txt", "")
    write(tmp_path / ".git" / "config", "hidden")
    assert data.load_documents(str(tmp_path)) == ["first", "second"]


def test_packing_eot_between_documents_and_split(tmp_path):
    write(tmp_path / "1.txt", "aaaaaaa")
    write(tmp_path / "2.txt", "bb")
    ds = data.build_dataset(cfg(path=str(tmp_path), val_fraction=0.2), None, seed=0)
    (src,) = ds.sources
    eot = ds.tokenizer.eot_id
    expected = [*b"aaaaaaa", eot, *b"bb", eot]  # every document followed by EOT
    np.testing.assert_array_equal(stream_of(src), expected)
    assert len(src.train) == int(len(expected) * 0.8) and len(src.val) == len(expected) - len(src.train)
    np.testing.assert_array_equal(src.train, expected[: len(src.train)])  # train is the head


def test_cache_reused_and_invalidated(tmp_path):
    corpus = tmp_path / "corpus.txt"
    write(corpus, "some text " * 100)
    workdir = str(tmp_path / "run")
    first = data.build_dataset(cfg(path=str(corpus)), workdir, seed=0)
    assert os.path.exists(os.path.join(workdir, "tokenizer.json"))
    (cached,) = os.listdir(os.path.join(workdir, "data_cache"))
    again = data.build_dataset(cfg(path=str(corpus)), workdir, seed=0)
    assert isinstance(again.sources[0].train, np.memmap)
    assert again.sources[0].train.dtype == np.uint16
    np.testing.assert_array_equal(stream_of(again.sources[0]), stream_of(first.sources[0]))
    write(corpus, "other text " * 100)  # new size: a new cache entry, new tokens
    changed = data.build_dataset(cfg(path=str(corpus)), workdir, seed=0)
    assert len(os.listdir(os.path.join(workdir, "data_cache"))) == 2
    assert ds_text(changed).startswith("other text")
    assert cached in os.listdir(os.path.join(workdir, "data_cache"))


def ds_text(ds):
    return ds.tokenizer.decode(stream_of(ds.sources[0]))


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def corpus(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(5):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], size=400)
        write(tmp_path / f"doc{i}.txt", " ".join(words))
    return str(tmp_path)


def test_train_batch_is_a_pure_function_of_seed_and_step(corpus):
    a = data.build_dataset(cfg(path=corpus), None, seed=3)
    b = data.build_dataset(cfg(path=corpus), None, seed=3)
    forward = [a.train_batch(s, 8, 32) for s in range(4)]
    backward = [b.train_batch(s, 8, 32) for s in reversed(range(4))][::-1]
    for x, y in zip(forward, backward):
        assert x.shape == (8, 33) and x.dtype == np.int32
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(a.train_batch(2, 8, 32), forward[2])  # repeat calls too
    assert not np.array_equal(forward[0], forward[1])
    assert not np.array_equal(a.train_batch(0, 8, 32), a.val_batch(0, 8, 32))
    other_seed = data.build_dataset(cfg(path=corpus), None, seed=4)
    assert not np.array_equal(other_seed.train_batch(0, 8, 32), forward[0])


@pytest.mark.parametrize("split", ["train", "val"])
def test_rows_are_windows_of_their_split(corpus, split):
    ds = data.build_dataset(cfg(path=corpus, val_fraction=0.3), None, seed=0)
    arr = np.asarray(getattr(ds.sources[0], split))
    windows = np.lib.stride_tricks.sliding_window_view(arr, 17)
    batch = ds.train_batch(1, 16, 16) if split == "train" else ds.val_batch(1, 16, 16)
    for row in batch:
        assert (windows == row).all(axis=1).any()


def test_mixture_draws_by_weight_not_size(tmp_path):
    big = write(tmp_path / "big.txt", "a" * 100_000)
    small = write(tmp_path / "small.txt", "b" * 1_000)
    ds = data.build_dataset(cfg(mixture=f"{big}:0.1,{small}:0.9"), None, seed=0)
    assert [s.name for s in ds.sources] == [big, small]
    rows = np.concatenate([ds.train_batch(step, 64, 16) for step in range(50)])
    from_small = np.mean([(row == ord("b")).any() for row in rows])
    assert abs(from_small - 0.9) < 0.03  # sizes alone would give ~0.01
    assert not any(((row == ord("a")).any() and (row == ord("b")).any()) for row in rows)


def test_epochs_report(tmp_path):
    a = write(tmp_path / "a.txt", "x" * 9_999)
    b = write(tmp_path / "b.txt", "y" * 999)
    ds = data.build_dataset(cfg(mixture=f"{a}:3,{b}"), None, seed=0)  # weights 3 and 1 -> .75/.25
    report = ds.epochs_report(1_000_000)
    assert [r["name"] for r in report] == [a, b]
    assert [r["train_tokens"] for r in report] == [9_000, 900]  # 90% of (text + EOT)
    assert [r["weight"] for r in report] == pytest.approx([0.75, 0.25])
    assert [r["epochs"] for r in report] == pytest.approx([750_000 / 9_000, 250_000 / 900])
    text = data.format_epochs_report(report, 1_000_000)
    assert a in text and "75.0%" in text and "277.778" in text


def test_parse_mixture():
    specs = data.parse_mixture("stdlib:0.6, /x/a.txt:0.3,/x/dir,/x:y/b.txt")
    assert [(s.name, s.weight) for s in specs] == [
        ("stdlib", 0.6), ("/x/a.txt", 0.3), ("/x/dir", 1.0), ("/x:y/b.txt", 1.0)
    ]


# ----------------------------------------------------------------------------- errors


def test_missing_path():
    with pytest.raises(UserError, match="does not exist: /no/such/corpus"):
        data.build_dataset(cfg(path="/no/such/corpus"), None, seed=0)


def test_empty_file(tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    with pytest.raises(UserError, match=f"no text found in {empty}"):
        data.load_documents(empty)


def test_folder_without_text(tmp_path):
    write(tmp_path / "blob.bin", b"\x00\x01\x02")
    with pytest.raises(UserError, match=f"no text found under {tmp_path}"):
        data.load_documents(str(tmp_path))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("stdlib:0.5,,/x:0.5", "empty entry"),
        ("stdlib:heavy", "'heavy' of 'stdlib' is not a number"),
        ("stdlib:-1", "must be a positive number"),
        ("stdlib:0", "must be a positive number"),
        ("stdlib:nan", "must be a positive number"),
        (":0.5", "has no source"),
        ("stdlib:1,stdlib:2", "listed twice"),
    ],
)
def test_bad_mixture(spec, message):
    with pytest.raises(UserError, match=message):
        data.parse_mixture(spec)


def test_split_shorter_than_window(tmp_path):
    short = write(tmp_path / "short.txt", "x" * 99)  # 100 tokens with EOT: train 90, val 10
    ds = data.build_dataset(cfg(path=short), None, seed=0)
    ds.train_batch(0, 2, 89)  # exactly one window fits
    with pytest.raises(UserError, match=f"{short}: its train split has 90 tokens.*91"):
        ds.train_batch(0, 2, 90)
    with pytest.raises(UserError, match=f"{short}: its val split has 10 tokens.*17"):
        ds.val_batch(0, 2, 16)


def test_workdir_tokenizer_kind_mismatch(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT)
    workdir = str(tmp_path / "run")
    data.build_dataset(cfg(path=corpus, tokenizer="byte"), workdir, seed=0)
    with pytest.raises(UserError, match="was made with a byte tokenizer but the config asks for char"):
        data.build_dataset(cfg(path=corpus, tokenizer="char"), workdir, seed=0)


def test_bad_config_values(tmp_path):
    corpus = write(tmp_path / "c.txt", TEXT)
    with pytest.raises(UserError, match="unknown tokenizer 'words'"):
        data.build_dataset(cfg(path=corpus, tokenizer="words"), None, seed=0)
    with pytest.raises(UserError, match="val_fraction"):
        data.build_dataset(cfg(path=corpus, val_fraction=1.0), None, seed=0)
    with pytest.raises(UserError, match="bpe_vocab_size must be at least 257"):
        data.build_dataset(cfg(path=corpus, tokenizer="bpe", bpe_vocab_size=100), None, seed=0)


# ----------------------------------------------------------------------------- embedded corpus


def test_stdlib_corpus_loads_and_byte_round_trips():
    docs = data.load_documents("stdlib")
    assert sum(len(d) for d in docs) > 1_000_000
    tok = ByteTokenizer()
    for doc in docs[:: max(1, len(docs) // 20)]:
        assert tok.decode(tok.encode(doc)) == doc
    ds = data.build_dataset(cfg(path=""), None, seed=0)
    assert ds.sources[0].name == "stdlib" and len(ds.sources[0].train) > 1_000_000
    assert ds.train_batch(0, 4, 128).shape == (4, 129)
