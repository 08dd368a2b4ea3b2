#!/usr/bin/env bash
# Set up (once) and run the main job: a small GPT on the embedded standard-library corpus.
# Extra arguments go to gpt_jax.train, e.g. --config.train.steps=100.
source "$(dirname "$0")/env.sh" ""
exec python -m gpt_jax.train --config experiments/default.py --workdir "${WORKDIR:-runs/default}" "$@"
