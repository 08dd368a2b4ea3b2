#!/usr/bin/env bash
# Set up (once) and run the whole test suite on CPU. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" "[dev]"
exec python -m pytest tests "$@"
