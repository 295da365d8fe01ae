"""Compare the diffusion and autoregressive priors of a demo run on its evaluation sets.

  python docs/measure_priors.py --embeddings runs/demo/embeddings --clip runs/demo/clip \
      --prior runs/demo/prior --ar-prior runs/demo/ar_prior [--rows 256] [--ar-guidance 1 2 4]

Per prior and evaluation set (test, test_unseen; the first --rows rows, as the stages' own
evaluation): the mean cosine of sampled z_i with the true z_i, the z_t baseline's, and the
colour / shape the demo's CLIP reads off the sampled embedding (nearest of the 18 zero-shot
captions "a {colour} {shape}", the caption's words as the truth; the true z_i's score is
CLIP's own zero-shot accuracy, the ceiling). Sampling time: wall and process CPU seconds of a
second, compiled call. Prints one JSON object per line. Images are not decoded (no decoder).
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dalle2_jax import checkpoint
from dalle2_jax.data import embeddings, shapes
from dalle2_jax.pipeline.storage import read_config
from dalle2_jax.tasks import ar_prior as ar_task
from dalle2_jax.tasks import clip as clip_task
from dalle2_jax.tasks import prior as prior_task
from pathlib import Path


def caption_labels(directory: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    source = embeddings.EmbeddingSource(directory)
    colours, kinds = [], []
    for i in range(count):
        words = source[i]["caption"].split()
        colours.append(next(shapes.COLOUR_NAMES.index(w) for w in words if w in shapes.COLOUR_NAMES))
        kinds.append(next(shapes.SHAPES.index(w) for w in words if w in shapes.SHAPES))
    return np.array(colours), np.array(kinds)


def zero_shot_text(clip_dir: str) -> np.ndarray:
    model, variables, tokenizer, _ = clip_task.load_clip(clip_dir)
    tokens = tokenizer(clip_task.zero_shot_captions())
    from dalle2_jax.models.clip import CLIP, normalize

    text = model.apply(variables, jnp.asarray(tokens["input_ids"]), jnp.asarray(tokens["attention_mask"]),
                       method=CLIP.encode_text)
    return np.asarray(normalize(text.embeds), np.float64)


def judge(embeds: np.ndarray, captions: np.ndarray, colours: np.ndarray, kinds: np.ndarray) -> dict[str, float]:
    best = np.argmax(prior_task.unit_norm(embeds) @ captions.T, axis=-1)
    colour_hit, shape_hit = best // len(shapes.SHAPES) == colours, best % len(shapes.SHAPES) == kinds
    return {"colour_acc": float(colour_hit.mean()), "shape_acc": float(shape_hit.mean()),
            "acc": float((colour_hit & shape_hit).mean())}


def load_task(kind: str, workdir: str, embeddings_dir: str, rows: int, overrides: dict):
    config = read_config(Path(workdir) / "config.json", "workdir")
    config.data.train_dir = f"{embeddings_dir}/train"
    config.data.eval_dirs = {"test": f"{embeddings_dir}/test", "test_unseen": f"{embeddings_dir}/test_unseen"}
    config.eval.update(num_examples=rows, batch_size=rows)
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    task = (ar_task if kind == "ar" else prior_task).make_task(config, workdir=workdir)
    return task, checkpoint.load_params(workdir, which="ema_params")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--embeddings", required=True)
    parser.add_argument("--clip", required=True)
    parser.add_argument("--prior", required=True)
    parser.add_argument("--ar-prior", required=True)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--ar-guidance", type=float, nargs="+", default=[2.0])
    parser.add_argument("--ar-candidates", type=int, nargs="+", default=[1])
    args = parser.parse_args()
    captions = zero_shot_text(args.clip)
    runs = [("diffusion", args.prior, {})]
    runs += [("ar", args.ar_prior, {"sampling.guidance_scale": g, "sampling.num_candidates": k})
             for g in args.ar_guidance for k in args.ar_candidates]
    for kind, workdir, overrides in runs:
        task, params = load_task(kind, workdir, args.embeddings, args.rows, overrides)
        params = jax.device_put(params)
        for name in ("test", "test_unseen"):
            rows = task.eval_rows(name)
            colours, kinds = caption_labels(task.eval_dirs[name], len(rows["image_embed"]))
            task.sample(params, rows)  # compile
            wall, cpu = time.perf_counter(), time.process_time()
            sampled = task.sample(params, rows)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            image = prior_task.unit_norm(rows["image_embed"])
            result = {"prior": kind, **overrides, "set": name, "rows": len(image),
                      "prior_cos": float(np.mean(np.sum(prior_task.unit_norm(sampled) * image, -1))),
                      "baseline_cos": float(np.mean(np.sum(prior_task.unit_norm(rows["text_embed"]) * image, -1))),
                      "sample_wall_s": round(wall, 2), "sample_cpu_s": round(cpu, 2),
                      "sampled_judged": judge(sampled, captions, colours, kinds),
                      "true_z_i_judged": judge(image, captions, colours, kinds)}
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
