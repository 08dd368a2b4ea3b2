"""Run in a subprocess with 8 fake CPU devices (XLA_FLAGS must be set before jax is imported).

Computes one step's loss and gradients of the same model and batch on a 1-device mesh and on
data=2, fsdp=2, tensor=2, runs one full train step on each, and writes everything to an .npz
for tests/test_sharding.py to compare. attention.impl is "auto", the path a Pallas kernel takes (the
reference stands in for it on CPU); the shapes that reach `kernels.sparse_attention` are recorded.
"""

import json
import sys

import jax
import numpy as np

import kernels

from conftest import tiny_config
from gpt_jax import sharding as shd
from gpt_jax.model import GPT, GPTConfig
from gpt_jax.optim import make_optimizer
from gpt_jax.train_step import Trainer


def main(out_path):
    assert jax.device_count() == 8, f"expected 8 fake devices, got {jax.device_count()}"
    # attention dropout too: its per-(row, head) seeds are made whole and split with the batch and
    # heads, so the masks, and with them the train step, do not depend on the mesh
    cfg = tiny_config(model=dict(n_head=4, attn_dropout=0.3))
    cfg.attention.impl = "auto"
    kernel_shapes = []
    sparse_attention = kernels.sparse_attention

    def recording(q, k, v, *args, **kwargs):
        kernel_shapes.append([list(q.shape), list(k.shape)])
        return sparse_attention(q, k, v, *args, **kwargs)

    kernels.sparse_attention = recording
    model_cfg = GPTConfig.from_config(cfg, vocab_size=128)
    batch = np.asarray(jax.random.randint(jax.random.key(5), (8, model_cfg.block_size + 1), 0, 128), np.int32)
    results, specs = {}, {}
    for name, shape, devices in [("single", dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                                 ("mesh", dict(data=2, fsdp=2, tensor=2), jax.devices())]:
        mesh = shd.make_mesh(shape, devices=devices)
        trainer = Trainer(GPT(model_cfg), make_optimizer(cfg.train), mesh, cfg.sharding_rules)
        state = trainer.init_state(jax.random.key(0))
        kernel_shapes.clear()
        batch_arr = jax.device_put(batch, trainer.batch_sharding)
        loss, grads = trainer.loss_and_grads(state.params, batch_arr)
        state, metrics = trainer.train_step(state, batch_arr, jax.random.key(1))
        specs[f"{name}/kernel_shapes"] = list(kernel_shapes)
        results[f"{name}/loss"] = np.asarray(loss)
        results[f"{name}/step_loss"] = np.asarray(metrics["loss"])
        for path, g in jax.tree_util.tree_leaves_with_path(grads):
            results[f"{name}/grad/{jax.tree_util.keystr(path)}"] = np.asarray(g)
        for path, p in jax.tree_util.tree_leaves_with_path(state.params):
            results[f"{name}/param/{jax.tree_util.keystr(path)}"] = np.asarray(p)
            specs[f"{name}/{jax.tree_util.keystr(path)}"] = [
                list(a) if isinstance(a, tuple) else a for a in p.sharding.spec]
        for path, x in jax.tree_util.tree_leaves_with_path(state.opt_state):  # AdamW's moments, count
            specs[f"{name}/opt{jax.tree_util.keystr(path)}"] = [
                list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]
    np.savez(out_path, **results)
    with open(out_path + ".json", "w") as f:
        json.dump(specs, f)


if __name__ == "__main__":
    main(sys.argv[1])
