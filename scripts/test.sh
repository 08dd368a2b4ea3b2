#!/usr/bin/env bash
# Set up (once) and run the whole test suite on CPU. Extra arguments go to pytest.
source "$(dirname "$0")/env.sh" "[dev]"
# Two worker processes, a test file each at a time (module fixtures run once): the kernel interpreters
# are single-threaded Python, so two cores run the suite in about 60% of the serial time.
# PYTEST_WORKERS=0 runs it in this process.
exec python -m pytest tests -n "${PYTEST_WORKERS:-2}" --dist loadfile "$@"
