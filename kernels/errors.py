"""The one error type the kernels raise for inputs they cannot take (sparse_attention's auto mode
falls back to the reference on it, and only on it)."""


class UnsupportedInput(ValueError):
    """A kernel cannot take these inputs; the message says what to change."""


class NotAvailable(Exception):
    """A benchmark alternative cannot run on this platform; the message is the reason it shows."""
