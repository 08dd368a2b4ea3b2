"""`python -m gpt_jax.align COMMAND --config experiments/align_<name>.py [--workdir DIR] [--config.<key>=<value>]`

    data     write the task files (SFT demonstrations, ranking, PPO and held-out prompts) to align.data_dir
    sft      supervised fine-tuning              (--workdir, default align.sft_workdir)
    rank     sample responses from SFT and let the scorer rank them into align.rank_data
    reward   train the reward model              (--workdir, default align.reward_workdir)
    ppo      PPO with a KL penalty to SFT        (--workdir, default align.ppo_workdir)
    eval     the scorer's mean on held-out prompts for a workdir's policy, or --base
    plot     PPO's reward and KL curves as a PNG (--workdir, --out)

sft, reward and ppo resume from their workdir's last checkpoint; Ctrl-C saves and exits 130.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags

from gpt_jax import cli
from gpt_jax import sharding as shd
from gpt_jax.errors import UserError, cli_entry

COMMANDS = ("data", "sft", "rank", "reward", "ppo", "eval", "plot")
DEFAULT_WORKDIR = {"sft": "sft_workdir", "reward": "reward_workdir", "ppo": "ppo_workdir"}


def _define_flags(fv):
    flags.DEFINE_string("workdir", None, "the stage's workdir (default: the config's align.<stage>_workdir)",
                        flag_values=fv)
    flags.DEFINE_boolean("base", False, "eval: judge the base model SFT starts from", flag_values=fv)
    flags.DEFINE_string("out", None, "eval: JSON file for the result; plot: the PNG", flag_values=fv)


def _usage() -> str:
    return f"usage: python -m gpt_jax.align {{{'|'.join(COMMANDS)}}} --config experiments/align_<name>.py [--workdir DIR]"


@cli_entry
def main(argv):
    if not argv or argv[0] not in COMMANDS:
        got = f" (got {argv[0]!r})" if argv else ""
        raise UserError(f"{_usage()}{got}")
    command, rest = argv[0], list(argv[1:])
    fv = cli.parse(rest, f"gpt_jax.align {command}", _define_flags, need_config=command != "plot")
    if command == "plot":
        from gpt_jax.align.evaluate import plot_ppo

        if not fv.workdir:
            raise UserError("plot: --workdir (a ppo workdir) is required")
        print(plot_ppo(fv.workdir, fv.out or os.path.join(fv.workdir, "ppo_curves.png")))
        return
    config = fv.config
    if "align" not in config:
        raise UserError("the config has no align section: use an alignment config (experiments/align_*.py)")
    shd.maybe_initialize_distributed()

    if command == "data":
        from gpt_jax.align.task import generate_task_files

        try:
            paths = generate_task_files(config.task, config.align.data_dir)
        except ValueError as e:
            raise UserError(str(e)) from None
        for name, path in paths.items():
            print(f"{name}: {path}")
        return
    if command == "rank":
        from gpt_jax.align.rank import run_rank

        run_rank(config)
        return
    if command == "eval":
        from gpt_jax.align.evaluate import evaluate, write_json

        if fv.base == bool(fv.workdir):
            raise UserError("eval: give exactly one of --workdir DIR and --base")
        result = evaluate(config, None if fv.base else fv.workdir)
        out = fv.out or (None if fv.base else os.path.join(fv.workdir, "eval.json"))
        if out:
            write_json(out, result)
        print(json.dumps({k: v for k, v in result.items() if k != "examples"}))
        return

    workdir = fv.workdir or config.align[DEFAULT_WORKDIR[command]]
    if not workdir:
        raise UserError(f"--workdir is required (or set align.{DEFAULT_WORKDIR[command]})")
    if command == "sft":
        from gpt_jax.align.sft import run_sft as run
    elif command == "reward":
        from gpt_jax.align.reward import run_reward as run
    else:
        from gpt_jax.align.ppo import run_ppo as run
    result = run(config, workdir)
    if result.interrupted:
        print(f"stopped at step {result.step}; checkpoint saved. Run the same command to resume.")
        sys.exit(130)
