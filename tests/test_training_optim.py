"""Learning-rate schedule, AdamW set-up (decay mask, clipping), EMA and gradient accumulation."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dalle2_jax import sharding
from dalle2_jax.training import optim


def opt_config(**overrides):
    config = ml_collections.ConfigDict(dict(
        learning_rate=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
        b1=0.9, b2=0.999, eps=1e-8, grad_clip_norm=0.0, grad_accum_steps=1))
    config.update(overrides)
    return config


def evaluate(schedule, steps):
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps)))


def test_warmup_then_cosine_schedule_values():
    schedule = optim.learning_rate_schedule(opt_config(), total_steps=110)
    peak, floor = 1e-3, 1e-4
    expected = {0: 0.0, 5: 0.5 * peak, 10: peak, 35: floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi / 4)),
                60: floor + (peak - floor) * 0.5, 110: floor, 200: floor}
    np.testing.assert_allclose(evaluate(schedule, list(expected)), list(expected.values()), rtol=1e-5, atol=1e-10)


def test_constant_schedule_and_no_warmup():
    constant = optim.learning_rate_schedule(opt_config(schedule="constant", warmup_steps=4), total_steps=100)
    np.testing.assert_allclose(evaluate(constant, [0, 2, 4, 50, 1000]), [0, 5e-4, 1e-3, 1e-3, 1e-3], rtol=1e-6)
    cosine = optim.learning_rate_schedule(opt_config(warmup_steps=0, min_lr_ratio=0.0), total_steps=100)
    np.testing.assert_allclose(evaluate(cosine, [0, 50, 100]), [1e-3, 5e-4, 0.0], rtol=1e-5, atol=1e-10)
    with pytest.raises(ValueError, match="optimizer.schedule"):
        optim.learning_rate_schedule(opt_config(schedule="linear"), total_steps=100)


def test_adamw_decays_matrices_only_and_clips_global_norm():
    params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))}
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    tx = optim.make_optimizer(opt_config(warmup_steps=0, schedule="constant", learning_rate=0.1,
                                         weight_decay=0.5), total_steps=10)
    updates, _ = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(zero_grads, params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * np.ones((2, 2)), rtol=1e-6)  # -lr * wd * p
    np.testing.assert_allclose(updates["bias"], np.zeros(2), atol=0)

    tx = optim.make_optimizer(opt_config(grad_clip_norm=1.0), total_steps=10)
    grads = {"kernel": jnp.full((2, 2), 3.0), "bias": jnp.full((2,), 4.0)}  # global norm sqrt(36 + 32)
    _, state = jax.jit(lambda g, p: tx.update(g, tx.init(p), p))(grads, params)
    mu = state[1][0].mu  # chain(clip, adamw): AdamW's first moment after one step is (1 - b1) * clipped grad
    scale = 1.0 / math.sqrt(68.0)
    np.testing.assert_allclose(mu["kernel"], 0.1 * 3.0 * scale * np.ones((2, 2)), rtol=1e-5)
    np.testing.assert_allclose(mu["bias"], 0.1 * 4.0 * scale * np.ones(2), rtol=1e-5)


def test_ema_decay_warmup_and_update():
    np.testing.assert_allclose(optim.ema_decay(np.array([0, 1, 90, 10**6]), 0.9999), [0.1, 2 / 11, 0.91, 0.9999],
                               rtol=1e-6)
    assert float(optim.ema_decay(0, 0.9999, warmup=False)) == pytest.approx(0.9999)
    ema = optim.update_ema({"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 6.0])}, 0.25)
    np.testing.assert_allclose(ema["w"], [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 6], rtol=1e-6)


def test_accumulated_gradients_equal_whole_batch_on_sharded_batch(devices8):
    def loss_fn(params, batch, rng):
        prediction = jnp.tanh(batch["x"] @ params["w"]) + params["b"]
        loss = jnp.mean((prediction - batch["y"]) ** 2)
        return loss, {"mean_prediction": jnp.mean(prediction)}

    data = np.random.default_rng(0)
    params = {"w": jnp.asarray(data.normal(size=(5, 3)), jnp.float32), "b": jnp.zeros(3)}
    local = {"x": data.normal(size=(32, 5)).astype(np.float32), "y": data.normal(size=(32, 3)).astype(np.float32)}
    batch = sharding.global_batch(local, sharding.make_mesh(8, 1))
    rng = jax.random.key(0)

    @jax.jit
    def both(params, batch):
        whole = optim.accumulate_gradients(loss_fn, params, batch, rng, 1)
        accumulated = optim.accumulate_gradients(loss_fn, params, batch, rng, 4)
        micro = optim.split_microbatches(batch, 4)
        return whole, accumulated, micro

    (loss_1, metrics_1, grads_1), (loss_4, metrics_4, grads_4), micro = both(params, batch)
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-6)
    np.testing.assert_allclose(metrics_4["mean_prediction"], metrics_1["mean_prediction"], rtol=1e-5, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), grads_4, grads_1)
    # micro-batch i holds rows i, i + 4, ...: each device's rows spread over every micro-batch
    np.testing.assert_array_equal(np.asarray(micro["x"][1]), local["x"][1::4])
    with pytest.raises(ValueError, match="grad_accum_steps"):
        optim.split_microbatches({"x": jnp.zeros((6, 2))}, 4)
