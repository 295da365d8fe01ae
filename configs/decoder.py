"""64px decoder configs: `get_config("tiny" | "base" | "paper" | "karlo")`.

`config.model` fills `dalle2_jax.models.unet.UNet` by keyword. `config.conditioning`
gives the CLIP shapes the decoder is built for (image embedding width, text
length and width); `dalle2_jax.tasks.decoder` overwrites them with those of the
frozen CLIP at `config.clip_dir` ("" = <workdir>/../clip), which encodes the
training images and captions on the fly, or they are read from the embedding
dataset at `config.embeddings_dir`. `config.data` is the image-caption
set (as in configs/clip.py; `image_size` 0 = the CLIP run's load size) and
`config.eval` the periodic sample grid of the 18 "a {colour} {shape}" test
images' embeddings, judged by `dalle2_jax.data.shapes.classify_shape_image`.
The `paper` variant follows Ramesh et al. 2022, Appendix C, Table 3: 3.5B
parameters, 512 channels, attention at 32, 16 and 8, 2048 x 800K, 250 sampling
steps with the learned variance. GLIDE's 3.5B included its 1.2B text
transformer; here the text comes from CLIP, so the UNet itself is made deeper
(3, 4, 5, 6 residual blocks from 64px down to 8px instead of 3 everywhere:
3.43B parameters, `jax.eval_shape` count) to land on the paper's size.
The `karlo` variant has exactly the shapes of Karlo v1 alpha's public decoder
(diffusers' UNet2DConditionModel + UnCLIPTextProjModel, imported by
`dalle2_jax.convert.karlo_unet`): 320-640-960-1280 channels, 3 blocks per
level, attention at 32/16/8 with head width 64, 1536-wide context, the pooled
text embedding added to the time embedding, the empty caption as the dropped
text; 893.4M parameters (diffusers' 893.3M + the stored 77 x 768 empty caption).
It is for fine-tuning imported weights: CLIP ViT-L/14's raw (not unit-norm)
embeddings, as Karlo was trained on (`unit_norm_embeddings=False`).
"""
import ml_collections

VARIANTS = ("tiny", "base", "paper", "karlo")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.compute_dtype = "float32"

    # CPU demo: 32px, 3.0M parameters, 16-32-64-128 channels at 32-16-8-4px, one block per
    # level, attention at 8 and 4px. The demo's decoder learns shapes with the number of examples
    # it sees (judged shapes 32% -> 45% -> 54% -> 59% after 900 -> 3600 steps at batch 16), so the
    # tiny network spends its FLOPs at the coarse levels: 0.91 GFLOP per example (forward +
    # backward) where 32-64-128 at 32-16-8px took 2.6 for the same parameter count; 0.19 s a
    # step at batch 16 on 2 CPU cores instead of 0.33. It resamples with a strided convolution
    # and a nearest-neighbour upsampling + convolution instead of ADM's residual blocks (base and
    # paper keep those): a step at batch 8 costs 0.11 s instead of 0.14 (the same morning), so
    # the demo's 20 minutes buy 6000 steps instead of 5000, and its generated shapes were judged
    # right 78.3% of the time instead of 68.2% (eight seeds, 576 images).
    model = dict(
        image_size=32,
        out_channels=3,
        learned_variance=False,
        channels=(),  # empty: model_channels * channel_mult
        model_channels=16,
        channel_mult=(1, 2, 4, 8),
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        mid_attention=True,
        head_dim=32,
        num_heads=0,
        num_groups=8,
        norm_eps=1e-5,
        scale_shift_norm=True,
        resblock_updown=variant != "tiny",
        dropout=0.0,
        time_embed_dim=0,
        use_image_embed=True,
        num_context_tokens=4,
        image_embed_mean=(),
        image_embed_std=0.0,
        use_text_encodings=True,
        use_text_embed=False,
        context_dim=128,
        null_text_tokens=0,
        use_low_res=False,
        low_res_resize="bicubic",
        use_noise_level=False,
        remat="none",
    )
    conditioning = dict(image_embed_dim=64, text_len=32, text_width=128)
    # True: the decoder is conditioned on unit-norm CLIP embeddings (the paper); False: on CLIP's
    # projected embeddings as they come (Karlo), and on the pooled text embedding too when
    # model.use_text_embed
    config.unit_norm_embeddings = variant != "karlo"
    config.clip_dir = ""  # CLIP training workdir or transformers CLIP directory; "" = <workdir>/../clip
    # "" = the frozen CLIP encodes every batch; else the `dalle2-jax embed` output of this train
    # split (row i = example i, checked on its captions; needs augment="center_crop", no flips):
    # the embeddings and token encodings are read, and CLIP only encodes the eval conditions.
    config.embeddings_dir = ""

    data = dict(
        name="shapes",  # or "folder" / "webdataset" at `source`
        source="",
        data_dir="",  # tfds builds; "" = <workdir>/../data, shared with the other stages
        image_size=0,  # load size; 0 = the CLIP run's (the decoder's size is model.image_size)
        seed=0,  # of the shapes build, not of training
        num_train=20_000,
        num_test=1_000,
        num_test_unseen=500,
        augment="center_crop",
        random_flip=False,  # shapes captions say "left"/"right"
        worker_count=0,
    )
    eval_config = dict(
        samples_per_condition=2,  # per "a {colour} {shape}" test image (shapes data)
        num_conditions=8,  # first training examples used as conditions for other data
        sampling_steps=12,  # guidance scale, sampler and eta as in config.diffusion
        seed=0,
    )

    diffusion = dict(
        schedule="cosine",
        num_timesteps=1000,
        # tiny: v; short CPU runs of eps models sample noise (demo, 480 steps: eps samples stay
        # noisy, v samples are clean). base and paper: eps, as the paper and the public weights.
        objective="v",
        vlb_weight=1e-3,  # hybrid loss weight when learned_variance
        snr_gamma=5.0,  # Min-SNR-gamma loss weighting (0 = none; diffusion.losses.training_losses)
        # tiny: DDIM eta 1 at 12 steps. On the demo's trained decoder (18 captions x 4 images, seeds
        # 0-300) it judged as 50 steps did (colour / shape / both 92.7 / 76.7 / 72.9% against 93.8 /
        # 76.4 / 72.9%) in a quarter of the evaluations; the ODE solvers at 10-15 steps left blotchy
        # backgrounds (dpm++2m 10: colour 52%, unipc 10: 57%); dpm++2m-sde 12: shape 72.9%
        # (docs/measurements.md, "Fast samplers (issue 30)").
        sampler="ddim",
        sampling_steps=12,
        # tiny: 1, DDIM with the DDPM posterior's noise: on the demo's decoder (3600 steps, 108
        # judged samples of the 18 test conditions) shapes came out right 59% of the time with
        # eta 0 at 25 steps and 68-70% with eta 1 at 50 or 100 steps.
        eta=1.0,
        clip_denoised=True,
        # tiny: 2. The demo's earlier 5000-step decoder (residual resampling), 18 captions x 4
        # generated images a seed: shape judged right 62.5 / 68.1 / 70.1 / 63.9 / 61.1% at guidance
        # 1 / 1.5 / 2 / 3 / 4 (seeds 0, 100, 200, 300), colour 98-100% at each; over eight seeds
        # (576 images) 68.2% at 2 against 64.4% at 3, unseen pairs both right 67% against 64% (an
        # early 900-step decoder's colour was 40% unguided, 81% at 3, 93% at 5). base, paper: 3.
        guidance_scale=2.0,
        drop_image_prob=0.1,  # paper: the CLIP image embedding is dropped 10% of the time
        drop_text_prob=0.5,  # and the caption 50%
    )

    # tiny: the image embedding is standardised with the statistics of this many training
    # examples (UNet.image_embed_mean/std, filled in by the decoder task); 0 = fed as it is
    # (base, paper: as the paper and the public weights)
    config.image_embed_stats_examples = 2048 if variant == "tiny" else 0

    config.total_steps = 20_000
    config.batch_size = 64
    config.log_every = 100
    config.eval_every = 2_000
    config.checkpoint_every = 2_000
    config.keep_checkpoints = 3
    config.progress_bar = True
    config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, min_fsdp_size=2**18))
    config.optimizer = ml_collections.ConfigDict(dict(
        learning_rate=3e-4,
        warmup_steps=500,
        schedule="cosine",
        weight_decay=0.0,
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        grad_clip_norm=1.0,
        grad_accum_steps=1,
    ))
    config.ema = ml_collections.ConfigDict(dict(decay=0.999, warmup=True))

    if variant == "base":
        # ADM ImageNet-64 width with CLIP ViT-L/14 conditioning: 318M parameters.
        model.update(image_size=64, learned_variance=True, model_channels=192,
                            channel_mult=(1, 2, 3, 4), num_res_blocks=3, attention_resolutions=(32, 16, 8),
                            head_dim=64, num_groups=32, dropout=0.1, context_dim=768)
        conditioning.update(image_embed_dim=768, text_len=77, text_width=768)
        diffusion.update(sampler="ddpm", sampling_steps=100, eta=0.0, objective="eps", guidance_scale=3.0,
                         snr_gamma=0.0)
        config.total_steps = 400_000
        config.batch_size = 256
        config.optimizer.update(learning_rate=1.2e-4, warmup_steps=5_000)
        config.ema.decay = 0.9999
    elif variant == "paper":
        # CLIP ViT-H/16: 1024-d embeddings and text encodings; GLIDE's 2048-wide context.
        model.update(image_size=64, learned_variance=True, model_channels=512,
                            channel_mult=(1, 2, 3, 4), num_res_blocks=(3, 4, 5, 6),
                            attention_resolutions=(32, 16, 8), head_dim=64, num_groups=32, dropout=0.1,
                            context_dim=2048, remat="block")
        conditioning.update(image_embed_dim=1024, text_len=77, text_width=1024)
        diffusion.update(sampler="ddpm", sampling_steps=250, eta=0.0, objective="eps", guidance_scale=3.0,
                         snr_gamma=0.0)
        config.compute_dtype = "bfloat16"
        config.total_steps = 800_000
        config.batch_size = 2048
        config.optimizer.update(learning_rate=1.2e-4, warmup_steps=10_000)
        config.ema.decay = 0.9999
        config.mesh.fsdp = 8

    elif variant == "karlo":
        model.update(image_size=64, learned_variance=True, channels=(320, 640, 960, 1280), num_res_blocks=3,
                     attention_resolutions=(32, 16, 8), head_dim=64, num_groups=32, resblock_updown=True,
                     context_dim=1536, use_text_embed=True, null_text_tokens=2, remat="block")
        conditioning.update(image_embed_dim=768, text_len=77, text_width=768)
        # diffusers' UnCLIPPipeline decoder defaults: 25 steps at guidance 8
        diffusion.update(sampler="ddpm", sampling_steps=25, eta=0.0, objective="eps", guidance_scale=8.0,
                         snr_gamma=0.0)
        config.compute_dtype = "bfloat16"
        config.total_steps = 10_000
        config.batch_size = 64
        config.optimizer.update(learning_rate=1e-5, warmup_steps=500, schedule="constant")
        config.ema.decay = 0.9999
        # Fine-tune imported weights with --config.init_from=DIR (a converted pipeline or the diffusers
        # UnCLIP directory)
        config.init_from = ""

    config.model = ml_collections.ConfigDict(model)
    config.model.dtype = config.get_ref("compute_dtype")
    config.image_size = config.model.get_ref("image_size")
    config.conditioning = ml_collections.ConfigDict(conditioning)
    config.data = ml_collections.ConfigDict(data)
    config.eval = ml_collections.ConfigDict(eval_config)
    config.diffusion = ml_collections.ConfigDict(diffusion)
    config.diffusion.learned_variance = config.model.get_ref("learned_variance")
    return config
