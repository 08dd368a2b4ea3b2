"""The command lines as a user meets them: bad input gives one line and exit 2, nothing saved is
lost, Ctrl-C saves and the same command resumes, and sampling reads a workdir."""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, assert_one_line_error, run_cli

TINY = ["--config", "experiments/default.py", "--config.model.n_layer=2", "--config.model.n_embd=64",
        "--config.model.n_head=2", "--config.model.block_size=64", "--config.attention.window=16",
        "--config.attention.stride=16", "--config.train.batch_size=8", "--config.train.eval_every=0",
        "--config.train.sample_tokens=0", "--config.train.log_every=1"]




@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("cli") / "run")
    proc = run_cli("gpt_jax.train", *TINY, "--workdir", workdir, "--config.train.steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return workdir


def snapshot(workdir):
    """Every file under the workdir's checkpoints with its size and modification time."""
    out = {}
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints")):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("extra,fragments", [
    (["--config.data.path=/no/such/file.txt"], ["/no/such/file.txt", "does not exist"]),
    (["--config.model.no_such_key=3"], ["model.no_such_key", "does not exist"]),
    (["--config.model.block_size=72"], ["block_size=72", "multiple of 16"]),
    (["--config.model.n_head=3"], ["n_head=3", "n_embd=64"]),
    (["--config.mesh.data=4"], ["4 devices", "1 are available"]),
], ids=["missing-data", "unknown-key", "seq-multiple", "heads-width", "mesh-size"])
def test_bad_input_is_one_line_and_exit_2(tmp_path, extra, fragments):
    proc = run_cli("gpt_jax.train", *TINY, "--workdir", str(tmp_path / "wd"), *extra)
    assert_one_line_error(proc, *fragments)


def test_data_without_text(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    proc = run_cli("gpt_jax.train", *TINY, "--workdir", str(tmp_path / "wd"), f"--config.data.path={empty}")
    assert_one_line_error(proc, str(empty))


def test_missing_config_file(tmp_path):
    proc = run_cli("gpt_jax.train", "--config", "experiments/nope.py", "--workdir", str(tmp_path))
    assert_one_line_error(proc, "experiments/nope.py", "does not exist")


def test_checkpoint_of_another_model_is_refused_and_kept(trained_workdir):
    before = snapshot(trained_workdir)
    proc = run_cli("gpt_jax.train", *TINY, "--workdir", trained_workdir, "--config.model.n_embd=128",
                   "--config.train.steps=8")
    assert_one_line_error(proc, "different model", "n_embd: 64 -> 128")
    assert snapshot(trained_workdir) == before


def test_truncated_checkpoint_is_reported_and_kept(tmp_path):
    workdir = str(tmp_path / "run")
    assert run_cli("gpt_jax.train", *TINY, "--workdir", workdir, "--config.train.steps=2").returncode == 0
    state_files = [p for p in snapshot(workdir) if os.sep + "state" + os.sep in p and os.path.getsize(p) > 64]
    assert state_files
    for path in state_files:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    before = snapshot(workdir)
    proc = run_cli("gpt_jax.train", *TINY, "--workdir", workdir, "--config.train.steps=4")
    assert_one_line_error(proc, "could not be read", "left in place")
    assert snapshot(workdir) == before


def test_sigint_saves_and_the_same_command_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    cmd = [sys.executable, "-u", "-m", "gpt_jax.train", *TINY, "--workdir", workdir, "--config.train.steps=100000"]
    env = {**os.environ, "PYTHONPATH": REPO}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    metrics = os.path.join(workdir, "metrics.jsonl")
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 200):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-2000:]
    assert "checkpoint saved" in out
    saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    assert saved and saved[-1] > 0

    again = run_cli("gpt_jax.train", *TINY, "--workdir", workdir, f"--config.train.steps={saved[-1] + 2}")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"resumed from step {saved[-1]}" in again.stdout + again.stderr


def test_sample_cli_streams_text(trained_workdir):
    proc = run_cli("gpt_jax.sample", "--workdir", trained_workdir, "--prompt", "def ", "--max_new_tokens", "12",
                   "--seed", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("def ") and len(proc.stdout.strip()) > len("def")


def test_sample_cli_errors(tmp_path):
    assert_one_line_error(run_cli("gpt_jax.sample", "--workdir", str(tmp_path), "--prompt", "x"), "config.json")


@pytest.mark.parametrize("module,flag", [("gpt_jax.train", "--workdir"), ("gpt_jax.sample", "--max_new_tokens"),
                                         ("gpt_jax.evaluate", "--shots")])
def test_help_lists_the_flags(module, flag):
    proc = run_cli(module, "--help")
    assert proc.returncode == 0 and flag in proc.stdout, proc.stderr[-2000:]
