"""Upsampler configs: `get_config("tiny" | "base" | "paper_256" | "paper_1024" | "karlo_256")`.

`config.model` fills `dalle2_jax.models.unet.UNet` by keyword: no attention, no
CLIP conditioning, the low-resolution image (`config.low_res_size`) resized to
the target size and concatenated with the noisy input. Training is on random
crops covering `crop_fraction` of the image area (side = image_size *
sqrt(crop_fraction)); sampling runs at full size. `degradation` corrupts the
conditioning image during training: "blur" (first upsampler) or "bsr" (second).
With `model.use_noise_level` the conditioning image is also noised to a level
drawn from [0, augment.max_noise_level] and the level is fed to the network.
`config.data` is the image set (as in configs/clip.py; `image_size` 0 = the
model's) and `config.eval` the periodic grid (low-res input, sample, ground
truth) of the first test images with the PSNR of the samples, read by
`dalle2_jax.tasks.upsampler`.
Paper numbers (Ramesh et al. 2022, Appendix C, Table 3), counted with
`jax.eval_shape`:
  paper_256: 320 channels x (1, 2, 3, 4), 3 blocks per level, 64 -> 256: 730M
    (paper 700M; the layout of Karlo's public 64 -> 256 upsampler), 27 DDIM steps.
  karlo_256: exactly Karlo v1 alpha's super_res_first / super_res_last (diffusers'
    UNet2DModel, imported by `dalle2_jax.convert.karlo_unet`): paper_256's layout
    with the time embedding added before the second norm instead of scale-shift:
    691.6M, as diffusers counts it; for fine-tuning imported weights.
  paper_1024: 192 channels x (1, 1, 2, 2, 4, 4), 2 blocks per level (ADM's 256px
    super-resolution layout), 256 -> 1024: 282M (paper 300M), 15 DDIM steps.
"""
import ml_collections

VARIANTS = ("tiny", "base", "paper_256", "paper_1024", "karlo_256")


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected one of {VARIANTS}, got {variant!r}")
    config = ml_collections.ConfigDict()
    config.variant = variant
    config.seed = 0
    config.compute_dtype = "float32"
    config.low_res_size = 32
    config.crop_fraction = 0.25  # of the area: crops of half the side
    # tiny: "none". Trained on blurred low-res images the residual upsampler over-sharpens the clean
    # ones the decoder makes (halos; 33.2 dB where clean training gives 34.8 at the demo's budget).
    config.degradation = "none"

    # CPU demo: 32 -> 64, 2.9M parameters.
    model = dict(
        image_size=64,
        out_channels=3,
        learned_variance=False,
        channels=(),  # empty: model_channels * channel_mult
        model_channels=32,
        channel_mult=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(),
        mid_attention=False,
        head_dim=64,
        num_heads=0,
        num_groups=8,
        norm_eps=1e-5,
        scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
        time_embed_dim=0,
        use_image_embed=False,
        num_context_tokens=0,
        use_text_encodings=False,
        use_text_embed=False,
        context_dim=0,
        null_text_tokens=0,
        use_low_res=True,
        low_res_resize="bicubic",
        use_noise_level=False,
        remat="none",
    )
    augment = dict(
        blur_sigma_range=(0.4, 0.6),  # "blur": Gaussian blur of the low-res image (CDM / DALLE2-pytorch)
        bsr_blur_sigma_range=(0.2, 2.0),  # "bsr": blur at the target size, then resize,
        bsr_updown_prob=0.5,  # an extra down/up round trip,
        bsr_noise_range=(0.0, 0.1),  # and Gaussian noise (std in [-1, 1] units)
        max_noise_level=250,  # with model.use_noise_level: diffusion level of the conditioning noise
    )
    data = dict(
        name="shapes",  # or "folder" / "webdataset" at `source`
        source="",
        data_dir="",  # tfds builds; "" = <workdir>/../data, shared with the other stages
        image_size=0,  # load size; 0 = model.image_size
        seed=0,  # of the shapes build, not of training
        num_train=20_000,
        num_test=1_000,
        num_test_unseen=500,
        augment="center_crop",
        random_flip=True,  # no captions here
        worker_count=0,
    )
    eval_config = dict(
        num_images=8,  # first test images (first training images for data without a test split)
        sampling_steps=0,  # set below to diffusion.sampling_steps; sampler and eta as in config.diffusion
        seed=0,
    )
    diffusion = dict(
        schedule="cosine",
        num_timesteps=1000,
        # tiny: x0 with `residual` (docs/measurements.md, "Upsampler grain"): v and eps left the
        # noise of x_t in the demo's short-trained samples; the other variants: eps, as the paper's.
        objective="x0",
        vlb_weight=1e-3,
        # tiny: 5 (Min-SNR weights the x0 error by min(SNR, 5): the low-noise steps that make the
        # final detail count most); the other variants: 0 (none).
        snr_gamma=5.0,
        # True (objective "x0"): the network predicts the image minus the upsampled low-res one, so
        # an untrained one gives bicubic and passes no noise through. tiny only.
        residual=True,
        sampler="ddim",
        sampling_steps=27,
        eta=0.0,
        clip_denoised=True,
    )

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
        # 64 -> 256, 125M parameters.
        config.low_res_size = 64
        config.degradation = "blur"
        model.update(image_size=256, model_channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     num_groups=32)
        config.total_steps = 500_000
        config.batch_size = 256
        config.optimizer.update(learning_rate=1.2e-4, warmup_steps=5_000)
        config.ema.decay = 0.9999
        diffusion.update(objective="eps", snr_gamma=0.0, residual=False)
    elif variant == "paper_256":
        config.low_res_size = 64
        config.degradation = "blur"
        model.update(image_size=256, model_channels=320, channel_mult=(1, 2, 3, 4), num_res_blocks=3,
                     num_groups=32, remat="block")
        diffusion.update(sampling_steps=27, objective="eps", snr_gamma=0.0, residual=False)
        config.compute_dtype = "bfloat16"
        config.total_steps = 1_000_000
        config.batch_size = 1024
        config.optimizer.update(learning_rate=1.2e-4, warmup_steps=10_000)
        config.ema.decay = 0.9999
        config.mesh.fsdp = 8
    elif variant == "paper_1024":
        config.low_res_size = 256
        config.degradation = "bsr"
        model.update(image_size=1024, model_channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                     num_groups=32, remat="block")
        diffusion.update(sampling_steps=15, objective="eps", snr_gamma=0.0, residual=False)
        config.compute_dtype = "bfloat16"
        config.total_steps = 1_000_000
        config.batch_size = 512
        config.optimizer.update(learning_rate=1.0e-4, warmup_steps=10_000)
        config.ema.decay = 0.9999
        config.mesh.fsdp = 8

    elif variant == "karlo_256":
        config.low_res_size = 64
        model.update(image_size=256, channels=(320, 640, 960, 1280), num_res_blocks=3, num_groups=32,
                     scale_shift_norm=False, remat="block")
        # diffusers' UnCLIPPipeline: 7 super-resolution steps
        diffusion.update(sampler="ddpm", sampling_steps=7, objective="eps", snr_gamma=0.0, residual=False)
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
    config.augment = ml_collections.ConfigDict(augment)
    config.data = ml_collections.ConfigDict(data)
    eval_config["sampling_steps"] = diffusion["sampling_steps"]
    config.eval = ml_collections.ConfigDict(eval_config)
    config.diffusion = ml_collections.ConfigDict(diffusion)
    config.diffusion.learned_variance = config.model.get_ref("learned_variance")
    return config
