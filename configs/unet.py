"""UNet configs for benchmarks: `get_config("bench")`, and aliases of the stage configs.

"bench" is the decoder layout the performance targets are measured on (the
Karlo decoder's blocks at small width): 64x64x3 input, channels (64, 128, 256,
512), 2 residual blocks per level, attention at 32, 16 and 8 with heads of width
32, scale-shift norm with 32 groups, a 512-d CLIP image embedding projected to
the time embedding and into 4 context tokens of width 256, 77 text tokens of
width 512 projected to 256, 6 output channels (learned variance); 72.9M
parameters. "decoder_<variant>" and "upsampler_<variant>" return
configs/decoder.py and configs/upsampler.py.
"""
import importlib.util
import os

import ml_collections

VARIANTS = ("bench",)


def _sibling_config(filename: str, variant: str) -> ml_collections.ConfigDict:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), filename)
    spec = importlib.util.spec_from_file_location(f"_configs_{filename[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(variant)


def get_config(variant: str = "bench") -> ml_collections.ConfigDict:
    if variant.startswith("decoder_"):
        return _sibling_config("decoder.py", variant[len("decoder_"):])
    if variant.startswith("upsampler_"):
        return _sibling_config("upsampler.py", variant[len("upsampler_"):])
    if variant not in VARIANTS:
        raise ValueError(f"variant: expected 'bench', 'decoder_<variant>' or 'upsampler_<variant>', got {variant!r}")

    config = _sibling_config("decoder.py", "tiny")
    config.variant = variant
    config.model = ml_collections.ConfigDict(dict(config.model.to_dict(), **dict(
        image_size=64,
        out_channels=3,
        learned_variance=True,
        channels=(64, 128, 256, 512),
        num_res_blocks=2,
        attention_resolutions=(32, 16, 8),
        mid_attention=True,
        head_dim=32,
        num_heads=0,
        num_groups=32,
        scale_shift_norm=True,
        resblock_updown=True,
        dropout=0.0,
        use_image_embed=True,
        num_context_tokens=4,
        use_text_encodings=True,
        use_text_embed=False,
        context_dim=256,
        remat="none",
    )))
    config.model.dtype = config.get_ref("compute_dtype")
    config.image_size = config.model.get_ref("image_size")
    config.conditioning = ml_collections.ConfigDict(dict(image_embed_dim=512, text_len=77, text_width=512))
    config.diffusion.learned_variance = config.model.get_ref("learned_variance")
    config.diffusion.sampling_steps = 50
    config.diffusion.objective = "eps"  # Karlo's decoder predicts eps
    config.batch_size = 8
    return config
