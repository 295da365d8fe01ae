"""`python -m dalle2_jax.bench karlo-generate [--dtype bfloat16] [--size full|small]`: Karlo text to
image end to end, ours against diffusers' UnCLIPPipeline, with the same random weights.

The reference process builds diffusers' UnCLIPPipeline with Karlo v1 alpha's shapes (`full`) or
a scaled-down copy (`small`, for a quick check), random weights (torch's default init, seeded),
a byte-level CLIP tokenizer made here (nothing is downloaded), writes it with save_pretrained and
times one call at diffusers' defaults (prior 25 steps at guidance 4, decoder 25 at 8, super-res
7; 256px). Then our process loads that directory (`UnCLIPPipeline.from_pretrained`, converting
it) and times `generate` twice with the same steps: the first call includes compilation, the
second is the steady state; compile time is their difference. Each side runs in its own
process, so its peak RSS (ru_maxrss) is its own; both include loading the weights.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT = "a high-resolution photograph of a big red frog on a green leaf"
WORDS = ["a", "high", "resolution", "photograph", "of", "big", "red", "frog", "on", "green", "leaf"]


def _bytes_to_unicode() -> dict[int, str]:
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in printable]
    return dict(zip(printable + extra, [chr(c) for c in printable] + [chr(256 + i) for i in range(len(extra))]))


def write_clip_tokenizer_files(directory: Path, words=WORDS) -> tuple[Path, Path]:
    """vocab.json and merges.txt of a byte-level CLIP BPE (every byte, merges for `words`)."""
    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in words:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            merges.append(f"{symbols[0]} {symbols[1]}")
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
            vocab.append(symbols[0])
    vocab = list(dict.fromkeys(vocab)) + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


def _configs(size: str) -> dict[str, dict]:
    from dalle2_jax.convert import karlo_prior, karlo_unet

    strip = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    configs = {
        "prior": strip(karlo_prior.KARLO_PRIOR_CONFIG),
        "text_proj": strip(karlo_unet.KARLO_TEXT_PROJ_CONFIG),
        "decoder": strip(karlo_unet.KARLO_DECODER_UNET_CONFIG),
        "super_res": strip(karlo_unet.KARLO_SUPER_RES_CONFIG),
        # OpenAI CLIP ViT-L/14's text tower, as Karlo's text_encoder/config.json.
        "text": dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, projection_dim=768,
                     hidden_act="quick_gelu"),
    }
    if size == "small":
        configs["prior"].update(num_layers=2, num_attention_heads=4, embedding_dim=64)
        configs["text"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               projection_dim=64, vocab_size=1024)
        configs["text_proj"].update(clip_embeddings_dim=64, time_embed_dim=128, cross_attention_dim=64)
        configs["decoder"].update(block_out_channels=[32, 64, 96, 128], layers_per_block=1,
                                  cross_attention_dim=64, attention_head_dim=32, norm_num_groups=16)
        configs["super_res"].update(block_out_channels=[32, 64, 96, 128], layers_per_block=1, norm_num_groups=16)
    return configs


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def build_reference(directory: Path, size: str, seed: int):
    """diffusers' UnCLIPPipeline with Karlo's shapes (`size`) and seeded random weights, written to
    `directory` with save_pretrained: (the pipeline, seconds to build and write it)."""
    import torch
    import transformers
    from diffusers import PriorTransformer, UNet2DConditionModel, UNet2DModel, UnCLIPPipeline, UnCLIPScheduler
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(seed)
    configs = _configs(size)
    vocab, merges = write_clip_tokenizer_files(directory / ".vocab")
    tokenizer = transformers.CLIPTokenizer(str(vocab), str(merges), model_max_length=77)
    text = transformers.CLIPTextConfig(eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                                       pad_token_id=tokenizer.pad_token_id, **configs["text"])
    start = time.perf_counter()
    with torch.no_grad():
        pipe = UnCLIPPipeline(
            prior=PriorTransformer(**configs["prior"]), decoder=UNet2DConditionModel(**configs["decoder"]),
            text_proj=UnCLIPTextProjModel(**configs["text_proj"]),
            text_encoder=transformers.CLIPTextModelWithProjection(text), tokenizer=tokenizer,
            super_res_first=UNet2DModel(**configs["super_res"]), super_res_last=UNet2DModel(**configs["super_res"]),
            prior_scheduler=UnCLIPScheduler(prediction_type="sample", clip_sample_range=5.0),
            decoder_scheduler=UnCLIPScheduler(variance_type="learned_range"),
            super_res_scheduler=UnCLIPScheduler())
        pipe.prior.clip_std.fill_(0.5)  # zero-initialised in PriorTransformer: give it CLIP-like statistics
        pipe.save_pretrained(directory)
    return pipe, time.perf_counter() - start


def reference_role(directory: Path, size: str, dtype: str, seed: int) -> dict[str, Any]:
    import torch

    pipe, build_s = build_reference(directory, size, seed)
    if dtype == "bfloat16":
        pipe = pipe.to(torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    with torch.no_grad():
        image = pipe(PROMPT, generator=torch.Generator().manual_seed(seed), output_type="np").images
    return {"generate_s": time.perf_counter() - start, "build_and_save_s": build_s, "peak_rss_gib": _peak_rss_gib(),
            "image_shape": list(image.shape), "torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def ours_role(directory: Path, dtype: str, seed: int) -> dict[str, Any]:
    import numpy as np

    from dalle2_jax.pipeline import UnCLIPPipeline

    start = time.perf_counter()
    pipe = UnCLIPPipeline.from_pretrained(directory, dtype=None if dtype == "float32" else dtype)
    load_s = time.perf_counter() - start
    load_rss = _peak_rss_gib()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        image = pipe.generate([PROMPT], seed=seed)
        times.append(time.perf_counter() - start)
    return {"first_generate_s": times[0], "generate_s": times[1], "compile_s": times[0] - times[1],
            "load_and_convert_s": load_s, "peak_rss_gib": _peak_rss_gib(), "peak_rss_after_load_gib": load_rss,
            "image_shape": list(np.shape(image))}


def _run_role(role: str, directory: Path, args) -> dict[str, Any]:
    command = [sys.executable, "-m", "dalle2_jax.bench.karlo", role, str(directory), "--size", args.size,
               "--dtype", args.dtype, "--seed", str(args.seed)]
    done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"karlo-generate: the {role} process failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def karlo_generate(args) -> dict[str, Any]:
    """Both sides in their own processes; see the module docstring."""
    from dalle2_jax.bench import common

    dtype = getattr(args, "dtype", None) or "float32"
    size = getattr(args, "size", None) or "full"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype: expected float32 or bfloat16, got {dtype!r}")
    if size not in ("full", "small"):
        raise ValueError(f"--size: expected full or small, got {size!r}")
    run_args = argparse.Namespace(size=size, dtype=dtype, seed=getattr(args, "seed", 0))
    with tempfile.TemporaryDirectory(prefix="karlo-bench-") as tmp:
        directory = Path(tmp) / "karlo"
        reference = _run_role("reference", directory, run_args)
        ours = _run_role("ours", directory, run_args)
    return {
        "mode": "karlo-generate", "size": size, "dtype": dtype, "prompt": PROMPT,
        "steps": {"prior": 25, "decoder": 25, "super_res": 7}, "guidance": {"prior": 4.0, "decoder": 8.0},
        "ours": ours, "diffusers": reference,
        "speedup_vs_diffusers": reference["generate_s"] / ours["generate_s"],
        "rss_ratio_ours_to_diffusers": ours["peak_rss_gib"] / reference["peak_rss_gib"],
        "cpu_cores": common.cpu_cores(), **common.device_info(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dalle2_jax.bench.karlo")
    parser.add_argument("role", choices=("reference", "ours"))
    parser.add_argument("directory")
    parser.add_argument("--size", default="full", choices=("full", "small"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    if args.role == "reference":
        result = reference_role(directory, args.size, args.dtype, args.seed)
    else:
        result = ours_role(directory, args.dtype, args.seed)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
