"""User-facing errors: one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input from the user (a path, a config value, a checkpoint): printed as one line."""


EXIT_USER_ERROR = 2


def cli_entry(main):
    """Wrap a CLI main(argv) so a UserError becomes `error: ...` on stderr and exit code 2."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(sys.argv[1:] if argv is None else argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(EXIT_USER_ERROR)

    return wrapper
