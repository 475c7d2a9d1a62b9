"""The model's parameters are trainable Flax state: optax steps through ``nnx.jit`` lower the loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from models.qwen2_5_vl import TextModel, tiny_config


def _loss(model: TextModel, ids: jax.Array) -> jax.Array:
    """Next-token cross-entropy of ``ids [B, N]`` (teacher forcing)."""
    logits = model(ids[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_optax_steps_lower_the_loss_on_a_fixed_batch():
    cfg = tiny_config(num_hidden_layers=2).text
    model = TextModel(cfg, rngs=nnx.Rngs(params=7))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 500, size=(2, 33)), jnp.int32)
    before = jax.tree.map(np.asarray, nnx.state(model, nnx.Param))

    @nnx.jit
    def step(model, optimizer, ids):
        loss, grads = nnx.value_and_grad(_loss)(model, ids)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer, ids)
    # every parameter gets a gradient (the stacked layers included: one leaf per field, all layers)
    zero = [jax.tree_util.keystr(path) for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]
            if not np.any(np.asarray(g))]
    assert not zero, zero
    losses = [float(first)] + [float(step(model, optimizer, ids)[0]) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.1, losses
    after = nnx.state(model, nnx.Param)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), before, after)
    assert all(jax.tree.leaves(moved))
