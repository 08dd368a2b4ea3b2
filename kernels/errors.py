"""The one error type the kernels raise for inputs they cannot take (sparse_attention's auto mode
falls back to the reference on it, and only on it)."""


class UnsupportedInput(ValueError):
    """A kernel cannot take these inputs; the message says what to change."""


class NotAvailable(Exception):
    """A benchmark alternative cannot run on this platform; the message is the reason it shows."""


def check_pattern_and_shapes(backend: str, q, k, v, pattern, supported_kinds) -> None:
    """The checks every kernel shares: a pattern it implements and self-attention shapes with GQA."""
    if pattern.kind not in supported_kinds:
        raise UnsupportedInput(f"{backend} supports patterns {supported_kinds}, not {pattern}; use impl='reference'")
    b, t, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[1] != t or k.shape[3] != d:
        raise UnsupportedInput(f"{backend} needs self-attention shapes: q {q.shape}, k {k.shape}, v {v.shape}")
    if h % k.shape[2]:
        raise UnsupportedInput(f"query heads {h} must be a multiple of kv heads {k.shape[2]}")
