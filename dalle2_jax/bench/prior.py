"""Diffusion prior benchmarks: a full AdamW training step and guided sampling with reranking."""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import config_util, diffusion
from dalle2_jax.bench import common
from dalle2_jax.models import prior as prior_lib
from dalle2_jax.training.optim import make_optimizer

# Train step of the `bench` shape measured on the project's 2-core CPU (docs: DESIGN.md);
# DALLE2-pytorch pads the text to 256 tokens, which is most of its cost.
REFERENCE_TRAIN_STEP_S = {"dalle2_pytorch": 44.3, "diffusers_prior_transformer": 19.5}


def example_batch(config, batch: int, rng: jax.Array) -> dict[str, jax.Array]:
    """Random unit CLIP embeddings and padded text encodings of the shapes `config.model` takes."""
    model = config.model
    keys = jax.random.split(rng, 4)
    length = model.max_text_len
    lengths = jax.random.randint(keys[3], (batch,), 1, length + 1)
    return {
        "image_embed": prior_lib.from_prior_scale(jax.random.normal(keys[0], (batch, model.embed_dim))),
        "text_embed": prior_lib.from_prior_scale(jax.random.normal(keys[1], (batch, model.embed_dim))),
        "text_encodings": jax.random.normal(keys[2], (batch, length, model.text_encoding_dim)),
        "text_mask": jnp.arange(length)[None] < lengths[:, None],
    }


def _text(batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
    return {k: batch[k] for k in ("text_embed", "text_encodings", "text_mask")}


def _model_and_params(config, batch: dict[str, jax.Array], rng: jax.Array):
    model = prior_lib.DiffusionPrior(**config.model)
    t = jnp.zeros((batch["image_embed"].shape[0],), jnp.int32)
    params = jax.jit(lambda key: model.init(key, batch["image_embed"], t, **_text(batch)))(rng)
    return model, params


def _num_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def prior_train(args) -> dict[str, Any]:
    """Forward, backward and AdamW update of the prior's x0 loss at `args.batch` (default: config)."""
    config = config_util.load_config(args.config, getattr(args, "overrides", ()))
    batch_size = args.batch or config.batch_size
    rng = jax.random.key(getattr(args, "seed", 0))
    batch = example_batch(config, batch_size, jax.random.fold_in(rng, 1))
    model, params = _model_and_params(config, batch, rng)
    schedule = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    opt_state = optimizer.init(params)
    text_drop_prob = float(config.diffusion.text_drop_prob)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch, key):
        (loss, _), grads = jax.value_and_grad(prior_lib.prior_loss, argnums=1, has_aux=True)(
            model, params, key, schedule=schedule, text_drop_prob=text_drop_prob, **batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params, opt_state, loss

    compiled, compile_s = common.compile_timed(train_step, params, opt_state, batch, rng)
    state = {"params": params, "opt": opt_state, "step": 0}

    def one_step():
        state["step"] += 1
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], batch,
                                                       jax.random.fold_in(rng, state["step"]))
        return loss

    times = common.time_calls(one_step, warmup=getattr(args, "warmup", 2), repeats=max(getattr(args, "repeats", 5), 5))
    loss = float(one_step())
    step_s = common.median(times)
    flops = common.flops_of(compiled)
    gflops = flops / step_s / 1e9
    # The matmul ceiling in the compute dtype, as unet-train measures it.
    matmul_dtype = jnp.dtype(config.model.dtype)
    matmul = common.matmul_gflops_per_s(dtype=matmul_dtype)
    return {
        "mode": "prior-train", "config": args.config, "batch": batch_size,
        "text_len": int(config.model.max_text_len), "params": _num_params(params),
        "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "step_times_s": [round(s, 4) for s in times], "flops_per_step": flops,
        "gflops_per_s": round(gflops, 2), "matmul_gflops_per_s": round(matmul, 2),
        "ratio_to_matmul": round(gflops / matmul, 3), "matmul_dtype": str(matmul_dtype),
        **{f"speedup_vs_{name}": round(ref / step_s, 2) for name, ref in REFERENCE_TRAIN_STEP_S.items()},
        "loss": loss, "dtype": str(config.model.dtype), **common.device_info(),
    }


def prior_sample(args) -> dict[str, Any]:
    """One jitted guided sampling program (text cache, lax.scan, k candidates, reranking)."""
    config = config_util.load_config(args.config, getattr(args, "overrides", ()))
    num_samples = args.batch or config.get("bench", {}).get("num_samples", 16)
    steps = args.steps or config.diffusion.sampling_steps
    guidance = config.diffusion.guidance_scale if args.guidance is None else float(args.guidance)
    num_candidates = int(config.diffusion.num_candidates)
    rng = jax.random.key(getattr(args, "seed", 0))
    batch = example_batch(config, num_samples, jax.random.fold_in(rng, 1))
    model, params = _model_and_params(config, batch, rng)
    schedule = diffusion.respace(
        diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps), steps)
    sample = jax.jit(functools.partial(
        prior_lib.sample_image_embeddings, model, steps=steps, sampler=config.diffusion.sampler,
        num_candidates=num_candidates, eta=float(config.diffusion.eta)))
    text = _text(batch)
    compiled, compile_s = common.compile_timed(sample, params, rng, **text, schedule=schedule,
                                               guidance_scale=guidance)
    warmup, repeats = getattr(args, "warmup", 2), getattr(args, "repeats", 5)
    times = common.time_calls(lambda: compiled(params, rng, **text, schedule=schedule, guidance_scale=guidance),
                              warmup=warmup, repeats=repeats)
    embeds = np.asarray(compiled(params, rng, **text, schedule=schedule, guidance_scale=guidance))

    # For scale: one full-sequence forward over the guided batch, what each step would cost
    # without the text cache.
    guided_batch = 2 * num_samples * num_candidates
    full = jax.tree.map(lambda a: jnp.concatenate([jnp.repeat(a, num_candidates, axis=0)] * 2), batch)
    t = jnp.full((guided_batch,), int(schedule.timesteps[steps // 2]), jnp.int32)
    drop_text = jnp.arange(guided_batch) >= guided_batch // 2
    forward = jax.jit(model.apply).lower(params, full["image_embed"], t, **_text(full), drop_text=drop_text).compile()
    forward_times = common.time_calls(
        lambda: forward(params, full["image_embed"], t, **_text(full), drop_text=drop_text),
        warmup=warmup, repeats=repeats)
    sample_s, forward_s = common.median(times), common.median(forward_times)
    return {
        "mode": "prior-sample", "config": args.config, "num_samples": num_samples, "steps": steps,
        "guidance": guidance, "num_candidates": num_candidates, "params": _num_params(params),
        "compile_s": round(compile_s, 3), "sample_s": round(sample_s, 3), "s_per_step": round(sample_s / steps, 4),
        "sample_times_s": [round(s, 3) for s in times],
        "full_forward_s": round(forward_s, 4), "full_forward_batch": guided_batch,
        "step_over_full_forward": round(sample_s / steps / forward_s, 3),
        "unit_norm": bool(np.allclose(np.linalg.norm(embeds, axis=-1), 1.0, atol=1e-4)),
        **common.device_info(),
    }
