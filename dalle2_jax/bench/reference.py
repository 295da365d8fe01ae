"""The reference a user would pick instead, timed in the same run: diffusers' UNet2DConditionModel.

`diffusers_unet(config)` builds the `bench` layout as diffusers writes the Karlo decoder
(ResnetDownsampleBlock2D / SimpleCrossAttn*Block2D / UNetMidBlock2DSimpleCrossAttn,
scale-shift norm, the projected image embedding as an identity class embedding) plus the
conditioning projections this project's UNet has inside (`UNet._conditioning`: image
embedding to the time embedding and to context tokens, text encodings to context width), so
both sides do the same work. Needs torch and diffusers (`pip install diffusers`), which the
project itself does not: `unet-train --reference` and `unet-sample --reference` add the
measured reference and the ratios to their JSON; without it they report none.
"""
from __future__ import annotations

from typing import Any

from dalle2_jax.bench import common
from dalle2_jax.models.unet import UNet


def _import_torch_diffusers():
    try:
        import diffusers
        import torch
    except ImportError as error:
        raise ValueError(f"--reference: needs torch and diffusers installed ({error}); "
                         "pip install diffusers") from error
    return torch, diffusers


def diffusers_unet(config, torch, diffusers):
    """(module, make_inputs(batch)) for `config.model` (a decoder layout) in diffusers."""
    model, shapes = config.model, config.conditioning
    if not model.use_image_embed or model.use_low_res:
        raise ValueError("config: the diffusers reference covers decoder layouts (use_image_embed, no low_res)")
    ours = UNet(**model)  # its level properties: the same channels and attention levels on both sides
    channels, attention, size = ours.level_channels, ours.level_attention, int(model.image_size)
    down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention]
    up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)]
    time_dim = model.time_embed_dim or 4 * channels[0]
    unet = diffusers.UNet2DConditionModel(
        sample_size=size, in_channels=3, out_channels=6 if model.learned_variance else 3,
        down_block_types=tuple(down), up_block_types=tuple(up),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=channels,
        layers_per_block=int(model.num_res_blocks), attention_head_dim=int(model.head_dim),
        cross_attention_dim=int(model.context_dim), norm_num_groups=int(model.num_groups),
        norm_eps=float(model.norm_eps), resnet_time_scale_shift="scale_shift",
        class_embed_type="identity", time_embedding_dim=time_dim, flip_sin_to_cos=True, freq_shift=0)
    embed_dim, text_len, text_width = shapes.image_embed_dim, shapes.text_len, shapes.text_width
    tokens, context = int(model.num_context_tokens), int(model.context_dim)

    class Decoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = unet
            self.embed_to_time = torch.nn.Linear(embed_dim, time_dim)
            self.embed_to_tokens = torch.nn.Linear(embed_dim, tokens * context)
            self.text_proj = torch.nn.Linear(text_width, context)
            self.text_norm = torch.nn.LayerNorm(context)

        def forward(self, x, t, image_embed, text_encodings, text_mask):
            extra = self.embed_to_tokens(image_embed).reshape(x.shape[0], tokens, context)
            text = self.text_norm(self.text_proj(text_encodings))
            mask = torch.cat([torch.ones(x.shape[0], tokens, dtype=torch.bool), text_mask], dim=1)
            return self.unet(x, t, encoder_hidden_states=torch.cat([extra, text], dim=1),
                             class_labels=self.embed_to_time(image_embed),
                             encoder_attention_mask=mask).sample

    def make_inputs(batch: int, seed: int = 0) -> dict[str, Any]:
        gen = torch.Generator().manual_seed(seed)
        embed = torch.randn(batch, embed_dim, generator=gen)
        lengths = torch.randint(1, text_len + 1, (batch,), generator=gen)
        return {"x": torch.rand(batch, 3, size, size, generator=gen) * 2 - 1,
                "t": torch.randint(0, 1000, (batch,), generator=gen),
                "image_embed": embed / embed.norm(dim=-1, keepdim=True),
                "text_encodings": torch.randn(batch, text_len, text_width, generator=gen),
                "text_mask": torch.arange(text_len)[None] < lengths[:, None]}

    return Decoder(), make_inputs


def _label(torch, diffusers) -> str:
    return f"diffusers {diffusers.__version__} UNet2DConditionModel, torch {torch.__version__}"


def _setup(config, batch: int, seed: int):
    torch, diffusers = _import_torch_diffusers()
    torch.set_num_threads(common.cpu_cores())
    torch.manual_seed(seed)
    module, make_inputs = diffusers_unet(config, torch, diffusers)
    return torch, diffusers, module, make_inputs(batch, seed)


def diffusers_train_step(config, batch: int, *, warmup: int = 1, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Median seconds of a float32 forward + backward + AdamW step of the eps MSE loss."""
    torch, diffusers, module, inputs = _setup(config, batch, seed)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-4)
    module.train()

    def step():
        noise = torch.randn_like(inputs["x"])
        out = module(inputs["x"] + noise, inputs["t"], inputs["image_embed"], inputs["text_encodings"],
                     inputs["text_mask"])
        loss = torch.nn.functional.mse_loss(out[:, :3], noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    times = common.time_calls(step, warmup=warmup, repeats=repeats)
    return {"reference": _label(torch, diffusers),
            "reference_step_s": round(common.median(times), 4),
            "reference_step_times_s": [round(s, 4) for s in times]}


def diffusers_forward(config, batch: int, *, warmup: int = 1, repeats: int = 3, seed: int = 0) -> dict[str, Any]:
    """Median seconds of one float32 inference forward at `batch`."""
    torch, diffusers, module, inputs = _setup(config, batch, seed)
    module.eval()

    def forward():
        with torch.inference_mode():
            module(**inputs)

    times = common.time_calls(forward, warmup=warmup, repeats=repeats)
    return {"reference": _label(torch, diffusers),
            "reference_forward_batch": batch, "reference_forward_s": round(common.median(times), 4),
            "reference_forward_times_s": [round(s, 4) for s in times]}
