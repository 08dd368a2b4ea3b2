"""The GPT-3 family experiment files have the appendix's parameter counts, and the plan CLI reports
parameters, FLOPs and per-device memory for a mesh."""

import importlib.util
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from conftest import REPO, run_cli
from gpt_jax.model import GPT, GPTConfig, count_params
from gpt_jax.plan import activation_bytes_per_sequence, param_bytes_per_device, parse_mesh
from gpt_jax.errors import UserError

# Brown et al. 2020, appendix (Table 2.1 shapes, vocab 50257, context 2048): parameters.
APPENDIX = {"small": 125_226_240, "medium": 355.9e6, "large": 760.3e6, "xl": 1315.7e6, "2_7b": 2651.6e6,
            "6_7b": 6658.4e6, "13b": 12853.4e6, "175b": 174604.3e6}
SHAPES = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (24, 1536, 16), "xl": (24, 2048, 16),
          "2_7b": (32, 2560, 32), "6_7b": (32, 4096, 32), "13b": (40, 5120, 40), "175b": (96, 12288, 96)}


def load(name):
    path = os.path.join(REPO, "experiments", f"gpt3_{name}.py")
    spec = importlib.util.spec_from_file_location(f"gpt3_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


@pytest.mark.parametrize("name", list(APPENDIX))
def test_experiment_file_parameter_count_matches_the_appendix(name):
    config = load(name)
    model_cfg = GPTConfig.from_config(config)
    assert (model_cfg.n_layer, model_cfg.n_embd, model_cfg.n_head) == SHAPES[name]
    assert (model_cfg.block_size, model_cfg.vocab_size) == (2048, 50257)
    assert config.train.batch_size % config.train.grad_accum == 0
    tokens = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
    n = count_params(nn.unbox(jax.eval_shape(lambda t: GPT(model_cfg).init(jax.random.key(0), t), tokens)["params"]))
    if name == "small":
        assert n == 125_226_240
    else:
        assert n == pytest.approx(APPENDIX[name], rel=5e-3)


def test_params_are_sharded_over_fsdp_and_tensor():
    model_cfg = GPTConfig.from_config(load("medium"))
    n, one = param_bytes_per_device(model_cfg, parse_mesh("data=1,fsdp=1,tensor=1"), load("medium").sharding_rules)
    assert one == 4 * n
    _, sharded = param_bytes_per_device(model_cfg, parse_mesh("data=4,fsdp=4,tensor=2"), load("medium").sharding_rules)
    # Every matrix splits 8 ways; LayerNorm vectors and the position table are not split over tensor.
    assert one / 8 <= sharded < one / 7
    full = activation_bytes_per_sequence(model_cfg, 1)
    assert activation_bytes_per_sequence(model_cfg, 4) < full
    remat = GPTConfig(**{**model_cfg.__dict__, "remat": "full"})
    # Full remat keeps one [T, h] input per layer plus one layer's set (16h bytes per token in bf16).
    s, h, L = 2048, 1024, 24
    assert full - activation_bytes_per_sequence(remat, 1) == pytest.approx(2 * s * (L * 16 * h - L * h - 16 * h), abs=2)


def test_bad_mesh_spec():
    with pytest.raises(UserError, match="expected data=N,fsdp=N,tensor=N"):
        parse_mesh("data=2,model=4")
    with pytest.raises(UserError, match="not an integer"):
        parse_mesh("data=two")


def test_plan_cli_for_175b():
    proc = run_cli("gpt_jax.plan", "--config", "experiments/gpt3_175b.py", "--mesh", "data=2,fsdp=64,tensor=8",
                   "--config.model.remat=full")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "174,604,259,328 parameters" in out and "= 1024 devices" in out
    assert "96 x dense" in out and "GFLOP per trained token" in out
    # fp32 params over fsdp x tensor = 512 shards: 174.6e9 * 4 / 512 bytes = 1.27 GiB, plus the few
    # vectors that are not split both ways.
    gib = {line.split("  ")[1].strip(): float(line.split()[-2]) for line in out.splitlines()
           if line.strip().endswith("GiB") and line.startswith("  ")}
    assert 1.27 <= gib["params"] <= 1.29 and gib["optimizer (AdamW mu, nu)"] == pytest.approx(2 * gib["params"], abs=0.015)


def test_plan_cli_sparse_attention_counts_fewer_pairs():
    proc = run_cli("gpt_jax.plan", "--config", "experiments/gpt3_small_sparse.py", "--mesh", "data=8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "6 x local_strided(window=256, stride=256)" in proc.stdout and "6 x dense" in proc.stdout
    assert "reads 264 keys per head and layer" in proc.stdout  # 256 band + 2048 / 256 strided
    bad = run_cli("gpt_jax.plan", "--config", "experiments/gpt3_small.py", "--mesh", "data=0")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith("error: ")


def test_compile_for_says_what_it_needs(monkeypatch):
    """--compile_for: without the compiler it needs (libtpu for a TPU, jax's CUDA plugin for an H100),
    and for a chip or device count it has no topology for, a one-line error (the compiles themselves
    are tests/test_kernels_tpu_aot.py and tests/test_kernels_gpu_compile.py, markers tpu_aot and gpu_aot)."""
    from gpt_jax.config import get_base_config
    from gpt_jax.plan import compiled_report
    from kernels import gpu_compile, tpu_compile

    config = get_base_config()
    # (module, its "is the compiler installed" switch, chip, mesh, the error wanted)
    cases = [(tpu_compile, "have_libtpu", False, "v5e", "data=2", "needs libtpu"),
             (tpu_compile, "have_libtpu", True, "v5e", "data=2,fsdp=3", "power-of-two number of chips, not 6"),
             (tpu_compile, "have_libtpu", True, "v7", "data=2", "unknown TPU chip 'v7'"),
             (gpu_compile, "have_cuda_plugin", False, "h100", "data=2",
              "--compile_for h100: compiling for an H100 needs jax's CUDA plugin"),
             (gpu_compile, "have_cuda_plugin", True, "h100", "data=4,fsdp=3", "come 8 a host .or fewer on one., not 12")]
    for module, switch, installed, chip, mesh, error in cases:
        monkeypatch.setattr(module, switch, lambda installed=installed: installed)
        with pytest.raises(UserError, match=error):
            compiled_report(config, parse_mesh(mesh), chip)
