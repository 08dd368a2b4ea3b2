"""Command-line parsing shared by the CLIs: `--config FILE --config.key=value` (ml_collections)
plus a few plain flags, with every parse problem turned into a one-line UserError."""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from gpt_jax.errors import UserError


def parse(argv: list[str], prog: str, define_extra=None, *, need_config: bool = True):
    """Parse argv with a fresh FlagValues (so several CLIs can live in one process).

    `define_extra(flag_values)` declares the CLI's own flags. Returns the FlagValues.
    """
    argv = normalize_flag_spellings(argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "experiment config file (experiments/*.py)",
                                    flag_values=fv, lock_config=True,
                                    sys_argv=[prog, *argv])  # overrides are read from here, not sys.argv
    if define_extra:
        define_extra(fv)
    if "--help" in argv or "-h" in argv:
        print(f"usage: python -m {prog} [--config experiments/<name>.py] [--config.<key>=<value> ...] [flags]\n")
        print(fv.get_help())
        raise SystemExit(0)
    config_path = _config_path(argv)
    if need_config and config_path is None:
        raise UserError(f"{prog}: --config=experiments/<name>.py is required")
    if config_path is not None and not os.path.isfile(config_path):
        raise UserError(f"config file {config_path} does not exist")
    try:
        fv([prog, *argv])
        if config_path is not None:
            fv.config  # noqa: B018  (loading the file happens on first access)
    except flags.Error as e:
        raise UserError(_one_line(e)) from None
    except (AttributeError, KeyError) as e:
        raise UserError(f"config key {_unknown_key(argv, e)} does not exist") from None
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"bad config ({_one_line(e)})") from None
    return fv


def normalize_flag_spellings(argv: list[str]) -> list[str]:
    """--max-new-tokens=3 -> --max_new_tokens=3 (absl only knows the underscore spelling);
    --config.* overrides and flag values are left alone."""
    out = []
    value_next = False  # the word after a bare "--flag" is its value, whatever it looks like
    for arg in argv:
        if not value_next and arg.startswith("--") and not arg.startswith("--config"):
            name, eq, value = arg[2:].partition("=")
            arg = "--" + name.replace("-", "_") + eq + value
            value_next = not eq
        else:
            value_next = False
        out.append(arg)
    return out


def _config_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
    return None


def _unknown_key(argv: list[str], error: Exception) -> str:
    """Name the `--config.a.b` override whose last part is the key the config did not have."""
    missing = str(error).strip("'\"")
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config."):].split("=", 1)[0]
            if missing in key.split("."):
                return repr(key)
    return repr(missing)


def _one_line(e: Exception) -> str:
    text = str(e).strip()
    if "Unknown command line flag 'config." in text:
        key = text.split("'")[1][len("config."):]
        return f"config key {key!r} does not exist"
    return text.splitlines()[0] if text else type(e).__name__
