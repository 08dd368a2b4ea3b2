"""Alignment data: JSONL loading with one-line errors, and the token layouts of the three stages.

Every prompt is encoded as [EOT] + prompt tokens, the way the pretraining stream puts a document
after an end-of-text token; a response is followed by EOT, which is also the sampler's stop token.

SFT packing (the choice the issue asks to state): whole examples [EOT, prompt, response] are packed
greedily into rows of block_size + 1 tokens, exactly as pretraining packs documents with an EOT
between them; an example never straddles two rows, so it is never cut and never sees the row
before it. Inside a row an example can attend to the examples before it, which is all that packing
with end-of-text already implies; `sft.pack=False` puts one example per row instead (no
cross-example attention at all, more padding). The loss covers the response tokens and the EOT
that ends each response; prompt tokens and padding are masked.
"""

from __future__ import annotations

import json
import os

import numpy as np

from gpt_jax.errors import UserError
from gpt_jax.tokenizer import Tokenizer


def read_jsonl(path: str, what: str) -> list[tuple[int, dict]]:
    """(line number, record) for each non-empty line; one-line UserErrors for a missing or bad file."""
    if not path or not os.path.isfile(path):
        raise UserError(f"{what} file {path or '(empty path)'} does not exist")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            out.append((n, record))
    if not out:
        raise UserError(f"{what} file {path} has no records")
    return out


def _text(record: dict, key: str, path: str, n: int, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise UserError(f"{path}:{n}: {key!r} is missing or not a non-empty string")
    return value


def load_demos(path: str) -> list[tuple[str, str]]:
    return [(_text(r, "prompt", path, n), _text(r, "response", path, n)) for n, r in read_jsonl(path, "SFT data")]


def load_prompts(path: str) -> list[str]:
    return [_text(r, "prompt", path, n) for n, r in read_jsonl(path, "prompt")]


def load_rankings(path: str, max_k: int) -> list[tuple[str, list[str], list[float] | None]]:
    """(prompt, responses best first, scores or None). Refuses rankings of fewer than 2 responses,
    more than max_k, a missing (null, empty, non-string) response, or the same response twice."""
    out = []
    for n, r in read_jsonl(path, "ranking"):
        prompt = _text(r, "prompt", path, n)
        responses = r.get("responses")
        if not isinstance(responses, list):
            raise UserError(f"{path}:{n}: 'responses' is missing or not a list (best first)")
        if len(responses) < 2:
            raise UserError(f"{path}:{n}: a ranking needs at least 2 responses, got {len(responses)}")
        if len(responses) > max_k:
            raise UserError(f"{path}:{n}: {len(responses)} responses, more than reward.max_k={max_k}")
        for i, resp in enumerate(responses):
            if not isinstance(resp, str) or not resp.strip():
                raise UserError(f"{path}:{n}: response {i + 1} of {len(responses)} is missing or empty")
        seen = {}
        for i, resp in enumerate(responses):
            if resp in seen:
                raise UserError(f"{path}:{n}: responses {seen[resp] + 1} and {i + 1} are the same text "
                                f"({resp[:40]!r}); a ranking needs distinct responses")
            seen[resp] = i
        scores = r.get("scores")
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(responses)):
            raise UserError(f"{path}:{n}: 'scores' must be a list with one number per response")
        out.append((prompt, list(responses), scores))
    return out


def encode_prompt(tok: Tokenizer, prompt: str) -> list[int]:
    return [tok.eot_id, *map(int, tok.encode(prompt))]


def encode_response(tok: Tokenizer, response: str) -> list[int]:
    """Response tokens followed by EOT (the stop token)."""
    return [*map(int, tok.encode(response)), tok.eot_id]


def strip_stop(tokens, eot_id: int) -> list[int]:
    """Generated tokens up to (not including) the first EOT."""
    tokens = [int(t) for t in tokens]
    return tokens[:tokens.index(eot_id)] if eot_id in tokens else tokens


def _check_fits(n_tokens: int, limit: int, where: str) -> None:
    if n_tokens > limit:
        raise UserError(f"{where}: {n_tokens} tokens, more than fit in model.block_size ({limit}); "
                        "shorten it or raise model.block_size")


# ---------------------------------------------------------------------------------------- SFT


def sft_rows(tok: Tokenizer, demos: list[tuple[str, str]], block_size: int, *, pack: bool, seed: int):
    """(tokens [rows, block_size + 1] int32, loss mask [rows, block_size] float32).

    Inputs are tokens[:, :-1], targets tokens[:, 1:]; mask[r, j] = 1 when target j is a response
    token or the EOT ending a response. Examples are shuffled (by seed) before packing."""
    examples = []
    for i, (p, r) in enumerate(demos):
        prompt, response = encode_prompt(tok, p), encode_response(tok, r)
        _check_fits(len(prompt) + len(response), block_size + 1, f"demonstration {i + 1}")
        examples.append((prompt, response[:-1]))  # the EOT that ends it is the next example's first token
    order = np.random.default_rng(seed).permutation(len(examples))
    rows, masks = [], []
    row, mask = [], []  # tokens of the open row, and per token whether it is a trained target

    def close():
        row.append(tok.eot_id), mask.append(1)  # the EOT that ends the row's last response
        pad = block_size + 1 - len(row)
        rows.append(row + [tok.eot_id] * pad)
        masks.append((mask + [0] * pad)[1:])  # target j is token j + 1
        row.clear(), mask.clear()

    for idx in order:
        prompt, response = examples[idx]
        if row and (not pack or len(row) + len(prompt) + len(response) + 1 > block_size + 1):
            close()
        # A packed example's leading EOT also ends the previous response: it is a target there.
        mask += [1 if row else 0] + [0] * (len(prompt) - 1) + [1] * len(response)
        row += prompt + response
    close()
    return np.asarray(rows, np.int32), np.asarray(masks, np.float32)


# ------------------------------------------------------------------------------ reward model


def sequence(tok: Tokenizer, prompt: str, response: str) -> list[int]:
    """What the reward model reads: [EOT] + prompt + response + EOT; its score is read at the last token."""
    return encode_prompt(tok, prompt) + encode_response(tok, response)


def pad_sequences(seqs: list[list[int]], block_size: int, pad: int, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(tokens [n, block_size] int32 right-padded, index of each sequence's last token [n])."""
    tokens = np.full((len(seqs), block_size), pad, np.int32)
    last = np.zeros(len(seqs), np.int32)
    for i, s in enumerate(seqs):
        _check_fits(len(s), block_size, f"{where} {i + 1}")
        tokens[i, :len(s)] = s
        last[i] = len(s) - 1
    return tokens, last


def ranking_arrays(tok: Tokenizer, rankings, block_size: int, max_k: int) -> dict[str, np.ndarray]:
    """tokens [n, max_k, block_size], last [n, max_k], valid [n, max_k] (slots beyond a prompt's K)."""
    n = len(rankings)
    tokens = np.full((n, max_k, block_size), tok.eot_id, np.int32)
    last = np.zeros((n, max_k), np.int32)
    valid = np.zeros((n, max_k), bool)
    for i, (prompt, responses, _) in enumerate(rankings):
        t, l = pad_sequences([sequence(tok, prompt, r) for r in responses], block_size, tok.eot_id,
                             f"ranking {i + 1}, response")
        k = len(responses)
        tokens[i, :k], last[i, :k], valid[i, :k] = t, l, True
    return {"tokens": tokens, "last": last, "valid": valid}


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The rows of step `step`: a fresh generator per (seed, step), so a resumed run gets the same."""
    return np.random.default_rng((seed, 7, int(step))).choice(n, size=batch_size, replace=n < batch_size)
