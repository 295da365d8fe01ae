"""`dalle2-jax serve`: a gradio page over one UnCLIPPipeline.

One tab per pipeline method (text to image, variations, interpolation, text diff,
inpainting). The pipeline is loaded once and shared; every event runs in one gradio queue
slot (concurrency id "pipeline", limit 1), so requests wait their turn instead of compiling
or sampling side by side, and the first request's compiled programs serve the later ones.
Bad input shows the pipeline's ValueError / FileNotFoundError message in the tab's status line
and the server keeps serving. Nothing leaves the host unless `share=True`: gradio's analytics
and version check are off and the default theme's fonts are served by the app itself.
"""
from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np
from PIL import Image

from dalle2_jax.pipeline import UnCLIPPipeline
from dalle2_jax.pipeline.stages import config_get

# Read by gradio (and huggingface_hub, which it imports) when they are imported.
OFFLINE_ENVIRONMENT = {"GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_DISABLE_TELEMETRY": "1",
                       "HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
os.environ.update(OFFLINE_ENVIRONMENT)
try:
    import gradio as gr
except ImportError:
    raise ImportError("dalle2-jax serve needs gradio: pip install 'dalle2-jax[serve]'") from None

MAX_IMAGES = 8
MAX_FRAMES = 9


def captions_from_text(text: str) -> list[str]:
    """One caption per non-blank line; blank text stays one (empty) caption for the pipeline to refuse."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines or [text or ""]


def _whole(value, name: str, minimum: int = 0) -> int:
    """gradio numbers arrive as floats (or None when the field is cleared)."""
    if value is None or isinstance(value, bool) or not float(value).is_integer() or value < minimum:
        raise ValueError(f"{name}: expected a whole number >= {minimum}, got {value!r}")
    return int(value)


def _steps(value, name: str) -> int:
    return _whole(value, name, minimum=1)


def _upload_path(payload, name: str) -> str:
    """The file of an unprocessed gr.Image value (the pipeline opens it and reports a bad one)."""
    path = payload.get("path") if isinstance(payload, dict) else payload
    if not path:
        raise ValueError(f"{name}: expected an uploaded image, got none")
    return str(path)


def mask_from_editor(value, name: str = "mask") -> tuple[str, np.ndarray]:
    """(background image path, bool mask) of an unprocessed gr.ImageEditor value: the mask is
    every pixel any brush layer painted (alpha > 0), at the background's size."""
    if not isinstance(value, dict) or not value.get("background"):
        raise ValueError("image: expected an uploaded image to paint the mask on, got none")
    background = _upload_path(value["background"], "image")
    with Image.open(background) as image:
        size = image.size
    mask = np.zeros(size[::-1], bool)
    for layer in value.get("layers") or []:
        with Image.open(_upload_path(layer, name)) as image:
            alpha = image.convert("RGBA").getchannel("A")
            if alpha.size != size:
                alpha = alpha.resize(size, Image.Resampling.NEAREST)
            mask |= np.asarray(alpha) > 0
    return background, mask


class PipelineApp:
    """The handlers behind the page: each returns (gallery items, status markdown)."""

    def __init__(self, pipe: UnCLIPPipeline):
        self.pipe = pipe
        self.defaults = {
            "prior_steps": int(config_get(pipe.prior.config, "diffusion.sampling_steps", 50)),
            "decoder_steps": int(config_get(pipe.decoder.config, "diffusion.sampling_steps", 50)),
            "upsampler_steps": int(config_get(pipe.upsamplers[0].config, "diffusion.sampling_steps", 50))
            if pipe.upsamplers else 0,
            "prior_guidance": float(config_get(pipe.prior.config, "diffusion.guidance_scale", 1.0)),
            "decoder_guidance": float(config_get(pipe.decoder.config, "diffusion.guidance_scale", 1.0)),
        }
        self.requests = 0

    def run(self, task: str, call: Callable[[], tuple[np.ndarray, list[str]]], progress=None):
        """`call()` -> (uint8 images, a label per image); a refused input becomes the status line."""
        names = [stage.name for stage in self.pipe.stages]

        def on_stage(name: str) -> None:
            if progress is not None:
                position = names.index(name) if name in names else 0
                progress(position / len(names), desc=f"{task}: {name}")

        self.pipe.stage_callback = on_stage
        self.requests += 1
        started = time.perf_counter()
        try:
            images, labels = call()
        except (ValueError, FileNotFoundError) as error:
            print(f"[serve] request {self.requests} ({task}): refused: {error}", flush=True)
            return [], f"**Error** (request {self.requests}): {error}"
        finally:
            self.pipe.stage_callback = None
        seconds = time.perf_counter() - started
        print(f"[serve] request {self.requests} ({task}): {len(images)} images in {seconds:.2f} s", flush=True)
        status = (f"{len(images)} image{'s' if len(images) != 1 else ''} of {images.shape[1]}x{images.shape[2]} "
                  f"in {seconds:.1f} s (request {self.requests})")
        return list(zip(images, labels)), status

    def generate(self, text, num_images, seed, prior_steps, decoder_steps, upsampler_steps, prior_guidance,
                 decoder_guidance, progress=gr.Progress()):
        def call():
            captions = captions_from_text(text)
            per_prompt = _whole(num_images, "num_images_per_prompt", 1)
            images = self.pipe.generate(
                captions, seed=_whole(seed, "seed"), num_images_per_prompt=per_prompt,
                prior_steps=_steps(prior_steps, "prior_steps"), decoder_steps=_steps(decoder_steps, "decoder_steps"),
                upsampler_steps=_steps(upsampler_steps, "upsampler_steps") if self.pipe.upsamplers else None,
                prior_guidance_scale=prior_guidance, decoder_guidance_scale=decoder_guidance)
            return images, [caption for caption in captions for _ in range(per_prompt)]

        return self.run("text to image", call, progress)

    def variations(self, image, num_images, seed, decoder_steps, decoder_guidance, invert, progress=gr.Progress()):
        def call():
            images = self.pipe.variations(
                _upload_path(image, "image"), num_images=_whole(num_images, "num_images", 1),
                seed=_whole(seed, "seed"), invert=bool(invert), decoder_steps=_steps(decoder_steps, "decoder_steps"),
                decoder_guidance_scale=decoder_guidance)
            return images, [f"variation {i + 1}" for i in range(len(images))]

        return self.run("variations", call, progress)

    def interpolate(self, image_a, image_b, num_frames, seed, decoder_steps, progress=gr.Progress()):
        def call():
            images = self.pipe.interpolate(
                _upload_path(image_a, "image_a"), _upload_path(image_b, "image_b"),
                num_frames=_whole(num_frames, "num_frames", 2), seed=_whole(seed, "seed"),
                decoder_steps=_steps(decoder_steps, "decoder_steps"))
            return images, [f"{theta:.2f}" for theta in np.linspace(0.0, 1.0, len(images))]

        return self.run("interpolation", call, progress)

    def text_diff(self, image, source, target, num_frames, seed, decoder_steps, progress=gr.Progress()):
        def call():
            images = self.pipe.text_diff(
                _upload_path(image, "image"), source, target, num_frames=_whole(num_frames, "num_frames", 2),
                seed=_whole(seed, "seed"), decoder_steps=_steps(decoder_steps, "decoder_steps"))
            return images, [f"frame {i + 1}" for i in range(len(images))]

        return self.run("text diff", call, progress)

    def inpaint(self, editor, prompt, num_images, seed, prior_steps, decoder_steps, decoder_guidance,
                progress=gr.Progress()):
        def call():
            background, mask = mask_from_editor(editor)
            images = self.pipe.inpaint(
                background, mask, prompt, seed=_whole(seed, "seed"), num_images=_whole(num_images, "num_images", 1),
                prior_steps=_steps(prior_steps, "prior_steps"), decoder_steps=_steps(decoder_steps, "decoder_steps"),
                decoder_guidance_scale=decoder_guidance)
            return images, [f"edit {i + 1}" for i in range(len(images))]

        return self.run("inpainting", call, progress)


def build_demo(pipe: UnCLIPPipeline):
    """The gradio Blocks page for `pipe` (not launched)."""
    app = PipelineApp(pipe)
    d = app.defaults
    size = pipe.image_size
    queue = dict(concurrency_id="pipeline", concurrency_limit=1, show_progress="full")

    def gallery(tab: str):
        return gr.Gallery(label="results", format="png", columns=4, object_fit="contain", height="auto",
                          buttons=["download", "download_all", "fullscreen"], interactive=False,
                          elem_id=f"{tab}-gallery")

    def seed_field(tab: str):
        return gr.Number(label="seed", value=0, precision=0, minimum=0, elem_id=f"{tab}-seed")

    def steps_field(label: str, value: int, tab: str):
        return gr.Number(label=label, value=value, precision=0, minimum=1, elem_id=f"{tab}-{label.replace(' ', '-')}")

    def upload(label: str, elem_id: str):
        return gr.Image(label=label, type="filepath", sources=["upload", "clipboard"], elem_id=elem_id)

    # Result PNGs older than a day are deleted (checked hourly): a long-running server stays small.
    with gr.Blocks(title="dalle2-jax", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"## dalle2-jax: unCLIP\nStages: {', '.join(s.name for s in pipe.stages)}; "
                    f"outputs {size}x{size}. Requests run one at a time; the first one compiles.")
        with gr.Tab("Text to image", id="t2i"):
            with gr.Row():
                with gr.Column():
                    captions = gr.Textbox(label="captions (one per line)", lines=3, value="a red circle",
                                          elem_id="t2i-captions")
                    num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="images per caption",
                                           elem_id="t2i-num-images")
                    seed = seed_field("t2i")
                    with gr.Row():
                        prior_steps = steps_field("prior steps", d["prior_steps"], "t2i")
                        decoder_steps = steps_field("decoder steps", d["decoder_steps"], "t2i")
                        upsampler_steps = steps_field("upsampler steps", max(d["upsampler_steps"], 1), "t2i")
                    with gr.Row():
                        prior_guidance = gr.Number(label="prior guidance", value=d["prior_guidance"])
                        decoder_guidance = gr.Number(label="decoder guidance", value=d["decoder_guidance"])
                    button = gr.Button("Generate", variant="primary", elem_id="t2i-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="t2i-status")
                    results = gallery("t2i")
            button.click(app.generate,
                         [captions, num_images, seed, prior_steps, decoder_steps, upsampler_steps, prior_guidance,
                          decoder_guidance], [results, status], api_name="generate", **queue)

        with gr.Tab("Variations", id="variations"):
            with gr.Row():
                with gr.Column():
                    image = upload("image", "variations-image")
                    num_images = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="images")
                    seed = seed_field("variations")
                    decoder_steps = steps_field("decoder steps", d["decoder_steps"], "variations")
                    decoder_guidance = gr.Number(label="decoder guidance", value=d["decoder_guidance"])
                    invert = gr.Checkbox(label="start from the image's own inverted noise (closer to the image)")
                    button = gr.Button("Make variations", variant="primary", elem_id="variations-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="variations-status")
                    results = gallery("variations")
            # Uploads reach the handlers unprocessed (preprocess=False), so that a file that is not
            # an image gets the pipeline's error message rather than one from inside gradio.
            button.click(app.variations,
                         [image, num_images, seed, decoder_steps, decoder_guidance, invert], [results, status],
                         api_name="variations", preprocess=False, **queue)

        with gr.Tab("Interpolation", id="interpolation"):
            with gr.Row():
                with gr.Column():
                    with gr.Row():
                        image_a = upload("image A", "interpolation-image-a")
                        image_b = upload("image B", "interpolation-image-b")
                    frames = gr.Slider(2, MAX_FRAMES, value=5, step=1, label="frames")
                    seed = seed_field("interpolation")
                    decoder_steps = steps_field("decoder steps", d["decoder_steps"], "interpolation")
                    button = gr.Button("Interpolate", variant="primary", elem_id="interpolation-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="interpolation-status")
                    results = gallery("interpolation")
            button.click(app.interpolate, [image_a, image_b, frames, seed, decoder_steps],
                         [results, status], api_name="interpolate", preprocess=False, **queue)

        with gr.Tab("Text diff", id="text-diff"):
            with gr.Row():
                with gr.Column():
                    image = upload("image", "text-diff-image")
                    source = gr.Textbox(label="caption of the image", value="a red circle", elem_id="text-diff-source")
                    target = gr.Textbox(label="caption to move towards", value="a blue circle",
                                        elem_id="text-diff-target")
                    frames = gr.Slider(2, MAX_FRAMES, value=5, step=1, label="frames")
                    seed = seed_field("text-diff")
                    decoder_steps = steps_field("decoder steps", d["decoder_steps"], "text-diff")
                    button = gr.Button("Apply the text diff", variant="primary", elem_id="text-diff-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="text-diff-status")
                    results = gallery("text-diff")
            button.click(app.text_diff, [image, source, target, frames, seed, decoder_steps],
                         [results, status], api_name="text_diff", preprocess=False, **queue)

        with gr.Tab("Inpainting", id="inpainting"):
            with gr.Row():
                with gr.Column():
                    editor = gr.ImageEditor(label="image: paint the region to replace", type="filepath",
                                            sources=["upload", "clipboard"], layers=False, transforms=(),
                                            brush=gr.Brush(colors=["rgba(255, 0, 255, 0.6)"], color_mode="fixed"),
                                            elem_id="inpainting-editor")
                    prompt = gr.Textbox(label="caption of the new content", value="a blue square",
                                        elem_id="inpainting-prompt")
                    num_images = gr.Slider(1, MAX_IMAGES, value=2, step=1, label="images")
                    seed = seed_field("inpainting")
                    with gr.Row():
                        prior_steps = steps_field("prior steps", d["prior_steps"], "inpainting")
                        decoder_steps = steps_field("decoder steps", d["decoder_steps"], "inpainting")
                    decoder_guidance = gr.Number(label="decoder guidance", value=d["decoder_guidance"])
                    button = gr.Button("Inpaint", variant="primary", elem_id="inpainting-run")
                with gr.Column():
                    status = gr.Markdown(elem_id="inpainting-status")
                    results = gallery("inpainting")
            button.click(app.inpaint,
                         [editor, prompt, num_images, seed, prior_steps, decoder_steps, decoder_guidance],
                         [results, status], api_name="inpaint", preprocess=False, **queue)
    demo.pipeline_app = app
    return demo


def serve(model: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Load the pipeline directory `model` once and serve the page until interrupted."""
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"--port: expected a port number in 1..65535, got {port!r}")
    started = time.perf_counter()
    pipe = UnCLIPPipeline.from_pretrained(model)
    print(f"[serve] loaded {model} ({', '.join(s.name for s in pipe.stages)}, {pipe.image_size}px) "
          f"in {time.perf_counter() - started:.1f} s", flush=True)
    demo = build_demo(pipe)
    demo.queue(default_concurrency_limit=1)
    demo.launch(server_name=host, server_port=port, share=share, ssr_mode=False, show_error=True,
                inbrowser=False, max_file_size="20mb")
