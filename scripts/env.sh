# Sourced by run.sh and test.sh: find a Python 3.12+ interpreter, create .venv once, install.
# Usage: source scripts/env.sh [pip extras, e.g. "[dev]"]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"

is_new_enough() { "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else 1)' >/dev/null 2>&1; }

find_python() {
  if [ -n "${PYTHON:-}" ]; then
    is_new_enough "$PYTHON" && { echo "$PYTHON"; return; }
    echo "error: PYTHON=$PYTHON is not a Python 3.12+ interpreter" >&2; return 1
  fi
  for name in python3.13 python3.12 python3; do
    local cand; cand="$(command -v "$name" 2>/dev/null)" || continue
    is_new_enough "$cand" && { echo "$cand"; return; }
  done
  if command -v pyenv >/dev/null 2>&1; then
    local root; root="$(pyenv root)"
    for cand in $(ls -d "$root"/versions/3.1[2-9]* 2>/dev/null | sort -rV); do
      is_new_enough "$cand/bin/python" && { echo "$cand/bin/python"; return; }
    done
  fi
  echo "error: no Python 3.12+ found (jax 0.11 needs it): set PYTHON=/path/to/python3.12" >&2
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="$(find_python)"
  echo "creating $VENV with $("$PY" --version)"
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
fi
# Reinstall only when setup.py changed since the last install.
STAMP="$VENV/.installed${1:-}"
if [ ! -f "$STAMP" ] || [ "$ROOT/setup.py" -nt "$STAMP" ]; then
  echo "installing gpt-jax${1:-} into $VENV"
  "$VENV/bin/python" -m pip install -q -e "$ROOT${1:-}"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
cd "$ROOT"
