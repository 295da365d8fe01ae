"""A tiny random diffusers UnCLIP model (Karlo's component classes at small widths), written with
save_pretrained, for the import and parity tests. Imported by tests only (needs torch, diffusers)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPScheduler
from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

EMBED, CONTEXT_LEN, CROSS = 32, 77, 48
DECODER_SIZE, SUPER_RES_SIZE, CLIP_IMAGE = 16, 32, 32
TEXT = dict(hidden_size=EMBED, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=CONTEXT_LEN, projection_dim=EMBED, hidden_act="quick_gelu")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              image_size=CLIP_IMAGE, patch_size=8, projection_dim=EMBED, hidden_act="quick_gelu")
PRIOR = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, embedding_dim=EMBED,
             num_embeddings=CONTEXT_LEN, additional_embeddings=4)
TEXT_PROJ = dict(clip_extra_context_tokens=4, clip_embeddings_dim=EMBED, time_embed_dim=128, cross_attention_dim=CROSS)
DECODER = dict(sample_size=DECODER_SIZE, layers_per_block=1, block_out_channels=[32, 64], in_channels=3,
               out_channels=6, down_block_types=["ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"],
               up_block_types=["SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"],
               mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=CROSS,
               class_embed_type="identity", attention_head_dim=16, resnet_time_scale_shift="scale_shift",
               norm_num_groups=8)
SUPER_RES = dict(sample_size=SUPER_RES_SIZE, layers_per_block=1, block_out_channels=[32, 64], in_channels=6,
                 out_channels=3, down_block_types=["ResnetDownsampleBlock2D"] * 2,
                 up_block_types=["ResnetUpsampleBlock2D"] * 2, add_attention=False, norm_num_groups=8)
WORDS = ["a", "red", "circle", "blue", "square", "photo", "of", "the", "frog", "big", "green", "leaf"]


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return dict(zip(printable + extra, [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]))


def write_clip_tokenizer(directory: Path) -> transformers.CLIPTokenizer:
    """A CLIP BPE vocabulary (all bytes plus merges for WORDS), saved as transformers writes it."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.append(symbols[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    raw = directory / "raw_tokenizer"
    raw.mkdir(parents=True)
    (raw / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (raw / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    tokenizer = transformers.CLIPTokenizer(str(raw / "vocab.json"), str(raw / "merges.txt"),
                                           model_max_length=CONTEXT_LEN)
    shutil.rmtree(raw)
    return tokenizer


def _randomize(module, seed: int):
    """Every parameter random, none left at a zero/one init that would hide a wrong mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if name == "clip_std":
                p.copy_(0.5 + noise.abs())
            elif name.endswith("bias") or name == "clip_mean":
                p.copy_(0.1 * noise)
            elif "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(noise / np.sqrt(np.prod(p.shape[1:]) if p.ndim > 1 else 1.0))
    return module.eval()


def _quiet_output(unet):
    """conv_out scaled to 0.1: at t = 999 x0 = (x - 0.99998 eps) / 0.0063, so a random UNet's O(1)
    eps unrelated to x turns float32 rounding (~3e-6 between torch and XLA) into ~1e-2 wherever x0
    lands inside the clip range; a trained one predicts eps ~ x there. Small eps keeps x0 clipped,
    as a trained model's is, and leaves the later steps (abar ~ 0.5) as sensitive as they are."""
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.1)
        unet.conv_out.bias.mul_(0.1)
    return unet


class Reference:
    """The in-memory diffusers components of one tiny model (diffusers cannot load text_proj back)."""

    def __init__(self, variations: bool, seed: int = 0):
        torch.manual_seed(seed)
        self.variations = variations
        self.tokenizer = None
        self.text_encoder = _randomize(transformers.CLIPTextModelWithProjection(
            transformers.CLIPTextConfig(vocab_size=1, **TEXT)), seed)  # vocab size fixed in write()
        self.prior = None if variations else _randomize(PriorTransformer(**PRIOR), seed + 1)
        self.text_proj = _randomize(UnCLIPTextProjModel(**TEXT_PROJ), seed + 2)
        self.decoder = _randomize(UNet2DConditionModel(**DECODER), seed + 3)
        self.super_res_first = _quiet_output(_randomize(UNet2DModel(**SUPER_RES), seed + 4))
        self.super_res_last = _quiet_output(_randomize(UNet2DModel(**SUPER_RES), seed + 5))
        self.prior_scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                               clip_sample=True, clip_sample_range=5.0, num_train_timesteps=1000)
        self.decoder_scheduler = UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon",
                                                 clip_sample=True, clip_sample_range=1.0, num_train_timesteps=1000)
        self.super_res_scheduler = UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon",
                                                   clip_sample=True, clip_sample_range=1.0, num_train_timesteps=1000)
        self.image_encoder = _randomize(transformers.CLIPVisionModelWithProjection(
            transformers.CLIPVisionConfig(**VISION)), seed + 6) if variations else None
        self.feature_extractor = transformers.CLIPImageProcessor(
            size={"shortest_edge": CLIP_IMAGE}, crop_size={"height": CLIP_IMAGE, "width": CLIP_IMAGE}) \
            if variations else None

    def components(self) -> dict:
        names = ["text_encoder", "tokenizer", "text_proj", "decoder", "super_res_first", "super_res_last",
                 "decoder_scheduler", "super_res_scheduler"]
        names += ["image_encoder", "feature_extractor"] if self.variations else ["prior", "prior_scheduler"]
        return {name: getattr(self, name) for name in names}

    def write(self, root: Path, *, text_proj_library: str = "diffusers", safe_serialization: bool = True) -> Path:
        """save_pretrained of every component and a model_index.json as diffusers writes it (or with
        text_proj as Karlo lists it: text_proj_library="unclip")."""
        root.mkdir(parents=True, exist_ok=True)
        self.tokenizer = write_clip_tokenizer(root)
        if self.text_encoder.config.vocab_size != len(self.tokenizer):
            config = transformers.CLIPTextConfig(vocab_size=len(self.tokenizer), eos_token_id=self.tokenizer.eos_token_id,
                                                 bos_token_id=self.tokenizer.bos_token_id,
                                                 pad_token_id=self.tokenizer.pad_token_id, **TEXT)
            self.text_encoder = _randomize(transformers.CLIPTextModelWithProjection(config), 11)
        index = {"_class_name": "UnCLIPImageVariationPipeline" if self.variations else "UnCLIPPipeline",
                 "_diffusers_version": "0.42.1"}
        for name, component in self.components().items():
            kwargs = {}
            if isinstance(component, torch.nn.Module):
                kwargs["safe_serialization"] = safe_serialization
            component.save_pretrained(root / name, **kwargs)
            library = "transformers" if type(component).__module__.startswith("transformers") else "diffusers"
            if name == "text_proj":
                library = text_proj_library
            index[name] = [library, type(component).__name__]
        (root / "model_index.json").write_text(json.dumps(index, indent=2))
        return root
