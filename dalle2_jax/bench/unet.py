"""UNet benchmarks: a full training step and a guided DDIM sampling loop."""
from __future__ import annotations

import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import config_util, diffusion
from dalle2_jax.bench import common, reference
from dalle2_jax.models.unet import UNet, compute_dtype
from dalle2_jax.training.optim import make_optimizer

# diffusers 0.42 UNet2DConditionModel with the Karlo decoder blocks at the `bench` width, torch 2.13
# CPU, as recorded on the 2-core machine of the DESIGN performance targets (a train step). Other
# machines differ (a later 2-core one: 4.11 s): `--reference` measures diffusers in the same run.
RECORDED_REFERENCE_TRAIN_STEP_S = 8.05


def example_conditioning(config, batch: int, rng: jax.Array) -> dict[str, jax.Array]:
    """Random conditioning of the shapes `config` asks for (CLIP embeddings, text, low-res image)."""
    model = config.model
    keys = iter(jax.random.split(rng, 6))
    cond: dict[str, jax.Array] = {}
    shapes = config.get("conditioning", {})
    if model.use_image_embed:
        embed = jax.random.normal(next(keys), (batch, shapes["image_embed_dim"]))
        cond["image_embed"] = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
        cond["drop_image"] = jnp.zeros((batch,), bool)
    if model.use_text_embed:
        embed = jax.random.normal(next(keys), (batch, shapes["image_embed_dim"]))
        cond["text_embed"] = embed / jnp.linalg.norm(embed, axis=-1, keepdims=True)
    if model.use_text_encodings:
        length, width = shapes["text_len"], shapes["text_width"]
        cond["text_encodings"] = jax.random.normal(next(keys), (batch, length, width))
        lengths = jax.random.randint(next(keys), (batch,), 1, length + 1)
        cond["text_mask"] = jnp.arange(length)[None] < lengths[:, None]
    if model.use_text_embed or model.use_text_encodings:
        cond["drop_text"] = jnp.zeros((batch,), bool)
    if model.use_low_res:
        low = config.low_res_size
        cond["low_res"] = jax.random.uniform(next(keys), (batch, low, low, 3), minval=-1.0, maxval=1.0)
    if model.use_noise_level:
        cond["noise_level"] = jnp.zeros((batch,), jnp.int32)
    return cond


def _model_and_params(config, batch: int, rng: jax.Array):
    model = UNet(**config.model)
    size = config.model.image_size
    init_key, data_key = jax.random.split(rng)
    x = jnp.zeros((batch, size, size, 3))
    cond = example_conditioning(config, batch, data_key)
    params = jax.jit(functools.partial(model.init, x=x, t=jnp.zeros((batch,), jnp.int32), **cond))(
        {"params": init_key, "dropout": init_key})
    return model, params, cond


def _num_params(params: Any) -> int:
    return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def unet_train(args) -> dict[str, Any]:
    """Full training step (forward, backward, AdamW) of the eps MSE loss; timing and FLOP/s."""
    config = config_util.load_config(args.config, args.overrides)
    # Before any compiling, so a bad --peak-tflops fails at once.
    info = common.device_info()
    peak = common.peak_tflops(info["platform"], info["device_kind"], getattr(args, "peak_tflops", None))
    batch = args.batch or 8
    rng = jax.random.key(args.seed)
    model, params, cond = _model_and_params(config, batch, rng)
    sched = diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    optimizer = make_optimizer(config.optimizer, config.total_steps)
    opt_state = optimizer.init(params)
    size = config.model.image_size
    x0 = jax.random.uniform(jax.random.fold_in(rng, 1), (batch, size, size, 3), minval=-1.0, maxval=1.0)

    def make_train_step(model):
        def loss_fn(params, x0, cond, key):
            t_key, noise_key, dropout_key = jax.random.split(key, 3)
            t = jax.random.randint(t_key, (x0.shape[0],), 0, sched.num_timesteps)
            noise = jax.random.normal(noise_key, x0.shape)
            x_t = diffusion.q_sample(sched, x0, t, noise)
            out = model.apply(params, x_t, sched.timesteps[t], **cond, train=True, rngs={"dropout": dropout_key})
            losses = diffusion.training_losses(sched, out[..., : x0.shape[-1]], x_start=x0, x_t=x_t, t=t,
                                               noise=noise, objective="eps")
            return jnp.mean(losses["loss"])

        @functools.partial(jax.jit, donate_argnums=(0, 1))
        def train_step(params, opt_state, x0, cond, key):
            loss, grads = jax.value_and_grad(loss_fn)(params, x0, cond, key)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
            return params, opt_state, loss

        return train_step

    train_step = make_train_step(model)
    # The model's work, counted on the plain formulation: XLA's cost analysis counts a loop body
    # once, so the blocked attention's lax.map would hide most of its FLOPs, and the phase-split
    # upsampling convolutions do 4/9 of the direct ones' multiply-adds; FLOP/s stays comparable
    # with implementations that upsample, then convolve.
    dense_model = model.clone(attention_impl="dense", upsample_conv="direct")
    flops = common.flops_of(make_train_step(dense_model).lower(params, opt_state, x0, cond, rng))
    cpu_start = time.process_time()
    compiled, compile_s = common.compile_timed(train_step, params, opt_state, x0, cond, rng)
    compile_cpu_s = time.process_time() - cpu_start
    state = {"params": params, "opt": opt_state, "step": 0}

    def one_step():
        state["step"] += 1
        key = jax.random.fold_in(rng, state["step"])
        state["params"], state["opt"], loss = compiled(state["params"], state["opt"], x0, cond, key)
        return loss

    times = common.time_calls(one_step, warmup=args.warmup, repeats=args.repeats)
    loss = float(one_step())
    cores = common.cpu_cores()
    step_s, step_cpu_s = common.median(times), common.median(times.cpu) / cores
    # The matmul ceiling in the compute dtype: float32 on CPU (the targets' reference), bf16 for an
    # accelerator run with --config.compute_dtype=bfloat16.
    matmul_dtype = compute_dtype(config.model.dtype)
    matmul = common.matmul_rates(dtype=matmul_dtype)
    matmul_wall, matmul_cpu = common.median(matmul), common.median(matmul.cpu)
    result = {
        "mode": "unet-train", "config": args.config, "batch": batch, "image_size": size,
        "params": _num_params(params), "compile_s": round(compile_s, 3), "step_s": round(step_s, 4),
        "step_times_s": [round(s, 4) for s in times], "flops_per_step": flops,
        "gflops_per_s": round(flops / step_s / 1e9, 2), "matmul_gflops_per_s": round(matmul_wall, 2),
        "ratio_to_matmul": round(flops / step_s / 1e9 / matmul_wall, 3),
        "speedup_vs_recorded_diffusers": round(RECORDED_REFERENCE_TRAIN_STEP_S / step_s, 3),
        # The same from this process's CPU seconds per core: what an idle machine would show.
        "cores": cores, "compile_cpu_s": round(compile_cpu_s / cores, 3), "step_cpu_s": round(step_cpu_s, 4),
        "gflops_per_s_cpu": round(flops / step_cpu_s / 1e9, 2), "matmul_gflops_per_s_cpu": round(matmul_cpu, 2),
        "ratio_to_matmul_cpu": round(flops / step_cpu_s / 1e9 / matmul_cpu, 3),
        "matmul_dtype": str(matmul_dtype),
        # The accelerator target: the step's FLOP/s over one device's bf16 peak (the step runs on one).
        "peak_tflops": peak, "ratio_to_peak": None if peak is None else round(flops / step_s / 1e12 / peak, 3),
        "loss": loss, "dtype": str(config.model.dtype), "remat": config.model.remat, **info,
    }
    if getattr(args, "reference", False):
        measured = reference.diffusers_train_step(config, batch, seed=args.seed)
        result.update(measured, speedup_vs_diffusers=round(measured["reference_step_s"] / step_s, 3))
    return result


def _drop_all(cond: dict[str, jax.Array]) -> dict[str, jax.Array]:
    uncond = dict(cond)
    for flag in ("drop_image", "drop_text"):
        if flag in uncond:
            uncond[flag] = jnp.ones_like(uncond[flag])
    return uncond


def unet_sample(args) -> dict[str, Any]:
    """One jitted DDIM loop (lax.scan) with classifier-free guidance as one batch of 2B."""
    config = config_util.load_config(args.config, args.overrides)
    batch = args.batch or 4
    steps = args.steps or 50
    guidance = 3.0 if args.guidance is None else float(args.guidance)
    rng = jax.random.key(args.seed)
    model, params, cond = _model_and_params(config, batch, rng)
    learned_variance = bool(config.model.learned_variance)
    objective = config.diffusion.get("objective", "eps")
    sched = diffusion.respace(diffusion.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps),
                              steps)
    size = config.model.image_size
    x_T = jax.random.normal(jax.random.fold_in(rng, 2), (batch, size, size, 3))

    def sample(params, x_T, cond, guidance_scale):
        denoiser = functools.partial(model.apply, params)
        if guidance_scale != 1.0:
            denoiser = diffusion.classifier_free_guidance(denoiser, guidance_scale, uncond=_drop_all(cond),
                                                          learned_variance=learned_variance)
        return diffusion.ddim_sample(denoiser, x_T, sched, cond=cond, objective=objective,
                                     learned_variance=learned_variance)

    guided = jax.jit(functools.partial(sample, guidance_scale=guidance))
    unguided = jax.jit(functools.partial(sample, guidance_scale=1.0))
    guided_c, compile_s = common.compile_timed(guided, params, x_T, cond)
    unguided_c, unguided_compile_s = common.compile_timed(unguided, params, x_T, cond)
    sample_times = common.time_calls(lambda: guided_c(params, x_T, cond), warmup=args.warmup,
                                     repeats=args.repeats)
    unguided_times = common.time_calls(lambda: unguided_c(params, x_T, cond), warmup=args.warmup,
                                       repeats=args.repeats)

    # One network evaluation on the guided batch [x; x] with [cond; uncond].
    both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, _drop_all(cond))
    x2 = jnp.concatenate([x_T, x_T])
    t2 = jnp.full((2 * batch,), int(sched.timesteps[steps // 2]), jnp.int32)
    forward = jax.jit(model.apply).lower(params, x2, t2, **both).compile()
    forward_times = common.time_calls(lambda: forward(params, x2, t2, **both), warmup=args.warmup,
                                      repeats=max(args.repeats, 5))
    sample_s, unguided_s = common.median(sample_times), common.median(unguided_times)
    forward_s = common.median(forward_times)
    images = np.asarray(guided_c(params, x_T, cond))
    result = {
        "mode": "unet-sample", "config": args.config, "batch": batch, "steps": steps, "guidance": guidance,
        "image_size": size, "params": _num_params(params), "compile_s": round(compile_s, 3),
        "unguided_compile_s": round(unguided_compile_s, 3),
        "sample_s": round(sample_s, 3), "s_per_step": round(sample_s / steps, 4),
        "sample_times_s": [round(s, 3) for s in sample_times],
        "unguided_sample_s": round(unguided_s, 3), "guided_over_unguided": round(sample_s / unguided_s, 3),
        "forward_s": round(forward_s, 4), "forward_batch": 2 * batch,
        "loop_over_forwards": round(sample_s / (steps * forward_s), 3),
        "finite": bool(np.isfinite(images).all()), **common.device_info(),
    }
    if getattr(args, "reference", False):
        # The reference's guided loop as DESIGN.md counts it: the conditional and unconditional
        # halves as 2 x `steps` batch-`batch` forwards (DALLE2-pytorch's way); also as `steps`
        # forwards at 2 x batch, the one-batch guidance this project uses.
        single = reference.diffusers_forward(config, batch, seed=args.seed)
        double = reference.diffusers_forward(config, 2 * batch, seed=args.seed)
        halves_s, batched_s = 2 * steps * single["reference_forward_s"], steps * double["reference_forward_s"]
        result.update(reference=single["reference"], reference_forward_s=single["reference_forward_s"],
                      reference_forward_2x_s=double["reference_forward_s"],
                      reference_sample_s=round(halves_s, 3), reference_batched_sample_s=round(batched_s, 3),
                      speedup_vs_diffusers=round(halves_s / sample_s, 3),
                      speedup_vs_diffusers_batched=round(batched_s / sample_s, 3))
    return result
