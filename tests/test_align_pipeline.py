"""The alignment pipeline end to end on a tiny model (data -> sft -> rank -> reward -> ppo -> eval),
its resumption, and its command line on bad input: one line, exit 2, nothing overwritten."""

import json
import os

import pytest

from conftest import assert_one_line_error, run_cli
from gpt_jax import cli
from gpt_jax.metrics import read_metrics


def tiny_args(root):
    corpus = os.path.join(root, "corpus.txt")
    if not os.path.exists(corpus):
        os.makedirs(root, exist_ok=True)
        with open(corpus, "w") as f:
            f.write("def add(a, b):\n    return a + b\n" * 200)
    return [
        "--config", "experiments/align_tasks.py",
        "--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
        "--config.model.dtype=float32", "--config.attention.impl=reference", f"--config.data.path={corpus}",
        f"--config.align.data_dir={root}/data", f"--config.align.sft_workdir={root}/sft",
        f"--config.align.reward_workdir={root}/reward", f"--config.align.ppo_workdir={root}/ppo",
        "--config.task.n_sft=200", "--config.task.n_rank=24", "--config.task.n_ppo=32", "--config.task.n_eval=16",
        "--config.sft.steps=20", "--config.sft.batch_size=8", "--config.sft.log_every=10", "--config.sft.ckpt_every=0",
        "--config.rank.samples=9", "--config.rank.batch_size=72",
        "--config.reward.steps=6", "--config.reward.batch_size=4", "--config.reward.eval_every=3",
        "--config.reward.log_every=3", "--config.reward.bias_demos=32", "--config.reward.ckpt_every=0",
        "--config.ppo.iterations=3", "--config.ppo.rollout_batch=8", "--config.ppo.minibatch=4",
        "--config.ppo.epochs=2", "--config.ppo.ptx_coef=0.1", "--config.ppo.ptx_batch=4",
        "--config.ppo.kl_target=6.0", "--config.ppo.kl_horizon=100", "--config.ppo.ckpt_every=0",
        "--config.eval.batch_size=16",
    ]


def tiny_config(root):
    return cli.parse(tiny_args(root), "test").config


def checkpoint_steps(workdir):
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from gpt_jax.align.ppo import run_ppo
    from gpt_jax.align.rank import run_rank
    from gpt_jax.align.reward import run_reward
    from gpt_jax.align.sft import run_sft
    from gpt_jax.align.task import generate_task_files

    root = str(tmp_path_factory.mktemp("align"))
    config = tiny_config(root)
    generate_task_files(config.task, config.align.data_dir)
    sft = run_sft(config, config.align.sft_workdir)
    ranked = run_rank(config)
    reward = run_reward(config, config.align.reward_workdir)
    # PPO stopped after one iteration (as by Ctrl-C), then resumed by the same call.
    first = run_ppo(config, config.align.ppo_workdir, stop_at_iteration=1)
    second = run_ppo(config, config.align.ppo_workdir)
    return dict(root=root, config=config, sft=sft, ranked=ranked, reward=reward, first=first, second=second)


def test_each_stage_completes_and_writes_its_checkpoint(pipeline):
    config = pipeline["config"]
    assert checkpoint_steps(config.align.sft_workdir)[-1] == 20
    assert checkpoint_steps(config.align.reward_workdir)[-1] == 6
    assert checkpoint_steps(config.align.ppo_workdir)[-1] == 3
    for stage in ("sft", "reward", "ppo"):
        workdir = config.align[f"{stage}_workdir"]
        for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
            assert os.path.exists(os.path.join(workdir, name)), (stage, name)
        assert os.listdir(os.path.join(workdir, "tensorboard"))
    sft_losses = [r["loss"] for r in read_metrics(config.align.sft_workdir, "sft")]
    assert sft_losses[-1] < sft_losses[0]
    assert pipeline["ranked"]["prompts"] > 0 and 4 <= pipeline["ranked"]["mean_k"] <= 9


def test_reward_model_reports_held_out_accuracy_and_centers_demonstrations(pipeline):
    workdir = pipeline["config"].align.reward_workdir
    with open(os.path.join(workdir, "reward_eval.json")) as f:
        result = json.load(f)
    assert 0.0 <= result["pairwise_accuracy"] <= 1.0 and result["pairs"] > 0
    assert "bias_shift" in result
    val = read_metrics(workdir, "reward_val")
    assert [r["step"] for r in val] == [3, 6]


def test_ppo_logs_its_metrics_and_resumes_after_a_stop(pipeline):
    assert pipeline["first"].interrupted and pipeline["first"].step == 1
    assert not pipeline["second"].interrupted and pipeline["second"].step == 3
    records = read_metrics(pipeline["config"].align.ppo_workdir, "ppo")
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in ("score", "reward", "kl", "kl_coef", "value_loss", "policy_loss", "clip_frac", "response_length",
                "task_score", "ptx_loss"):
        assert key in records[-1], key
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    # The adaptive controller's value carried across the stop: iteration 2 used iteration 1's update.
    err = min(max(records[0]["kl"] / 6.0 - 1, -0.2), 0.2)
    assert records[1]["kl_coef"] == pytest.approx(records[0]["kl_coef"] * (1 + err * 8 / 100), rel=1e-5)


def test_eval_and_plot(pipeline, tmp_path):
    from gpt_jax.align.evaluate import evaluate, plot_ppo

    config = pipeline["config"]
    result = evaluate(config, config.align.ppo_workdir)
    assert result["model"] == "ppo" and result["prompts"] == 16 and 0 <= result["scorer_mean"] <= 1
    base = evaluate(config, None)
    assert base["model"] == "base (random init)"
    png = plot_ppo(config.align.ppo_workdir, str(tmp_path / "curves.png"))
    assert open(png, "rb").read(4) == b"\x89PNG"


# ------------------------------------------------------------------------------ bad input




def snapshot(*workdirs):
    out = {}
    for workdir in workdirs:
        for root, _, files in os.walk(workdir):
            for f in files:
                st = os.stat(os.path.join(root, f))
                out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("responses,fragment", [
    (["only one"], "at least 2 responses"),
    (["same", "other", "same"], "the same text"),
    (["a", None, "c", "d"], "response 2 of 4 is missing"),
], ids=["one-response", "duplicate", "missing"])
def test_bad_rankings_exit_2_and_leave_the_workdir_alone(pipeline, tmp_path, responses, fragment):
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text(json.dumps({"prompt": "What is 1+1?\n", "responses": ["2", "3"]}) + "\n"
                        + json.dumps({"prompt": "What is 1+2?\n", "responses": responses}) + "\n")
    reward_dir = pipeline["config"].align.reward_workdir
    before = snapshot(reward_dir)
    proc = run_cli("gpt_jax.align", "reward", *tiny_args(pipeline["root"]), f"--config.align.rank_data={rankings}",
                   "--workdir", reward_dir, "--config.reward.steps=12")
    assert_one_line_error(proc, f"{rankings}:2", fragment)
    assert snapshot(reward_dir) == before


@pytest.mark.parametrize("case", ["no-sft", "no-reward", "other-model", "sft-as-reward"])
def test_ppo_refuses_missing_or_mismatched_checkpoints(pipeline, tmp_path, case):
    config = pipeline["config"]
    extra, fragments = {
        "no-sft": ([f"--config.align.sft_workdir={tmp_path}/nope"], ["align.sft_workdir", "no tokenizer.json"]),
        "no-reward": ([f"--config.align.reward_workdir={tmp_path}/nope"], ["align.reward_workdir", "no checkpoints/"]),
        "other-model": (["--config.model.n_embd=64"], ["different model", "n_embd: 32 vs 64"]),
        "sft-as-reward": ([f"--config.align.reward_workdir={config.align.sft_workdir}"], ["holds a sft checkpoint"]),
    }[case]
    before = snapshot(config.align.sft_workdir, config.align.reward_workdir, config.align.ppo_workdir)
    new_workdir = str(tmp_path / "ppo")
    proc = run_cli("gpt_jax.align", "ppo", *tiny_args(pipeline["root"]), *extra, "--workdir", new_workdir)
    assert_one_line_error(proc, *fragments)
    assert not os.path.exists(new_workdir)
    assert snapshot(config.align.sft_workdir, config.align.reward_workdir, config.align.ppo_workdir) == before


def test_unknown_command_and_non_alignment_config(tmp_path):
    assert_one_line_error(run_cli("gpt_jax.align", "dance"), "usage: python -m gpt_jax.align")
    proc = run_cli("gpt_jax.align", "sft", "--config", "experiments/default.py", "--workdir", str(tmp_path / "w"))
    assert_one_line_error(proc, "no align section")
