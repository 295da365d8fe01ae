"""`shapes`: the project's captioned synthetic dataset, made offline from a seed.

One filled shape (circle, square or upward triangle) of one of six colours on a
plain background, drawn at 4x with PIL and box-downsampled for anti-aliasing.
Each example stores the image (PNG bytes in a `tfds.features.Image`, written to
array_record without TensorFlow), a caption, and the attributes as class ids.
Example `i` of a split is a pure function of (seed, split, i): it is drawn from
`numpy.random.Generator(PCG64(SeedSequence([seed, split_id, i])))`, so builds
are identical on every machine.

Splits: `train` and `test` never contain the held-out colour-shape pairs
(purple triangle, orange circle); `test_unseen` contains only them.

`classify_shape_image` is a pixel-level judge that recovers (colour, shape)
from an image, used to score generated samples. The renders are flat: their
background and fill are one colour each, so `border_noise` (the median RGB
distance of the border pixels to their median colour, 0-255 units) and
`fill_noise` (the mean distance of the shape's core pixels to their 3x3
neighbourhood's median, so smooth shading is not grain) are about 0 on them, and
the judge calls an image whose background or fill is visibly grainy (either
above `NOISE_LIMIT`) no shape.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import scipy.ndimage as ndi
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw

from dalle2_jax.data import common

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 135, 30),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "light_gray": (190, 190, 190),
    "dark_gray": (60, 60, 60),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
HELD_OUT_PAIRS = (("purple", "triangle"), ("orange", "circle"))
SPLITS = ("train", "test", "test_unseen")

_SPLIT_IDS = {"train": 0, "test": 1, "test_unseen": 2}
_SEEN_PAIRS = tuple((c, s) for c in COLOUR_NAMES for s in SHAPES if (c, s) not in HELD_OUT_PAIRS)
_SIZE_FRACTION = {"small": 0.25, "large": 0.5}
_POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                     "bottom": "at the bottom", "center": "in the center"}
_BACKGROUND_PHRASES = {"white": "white", "light_gray": "light gray", "dark_gray": "dark"}
_TEMPLATES = (
    "a {colour} {shape}",
    "a {size} {colour} {shape}",
    "a {colour} {shape} {position}",
    "a {size} {colour} {shape} {position}",
    "a {colour} {shape} on a {background} background",
    "a {size} {colour} {shape} {position} on a {background} background",
    "a {colour} {shape} {position} on a {background} background",
    "a picture of a {size} {colour} {shape}",
)
_SUPERSAMPLE = 4
_EDGE_MARGIN = 0.06  # gap between a shape's box and the image border, in image widths
_POSITION_JITTER = 0.04
_SIZE_JITTER = 0.1


def pairs_for_split(split: str) -> tuple[tuple[str, str], ...]:
    """The (colour, shape) pairs a split draws from."""
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return HELD_OUT_PAIRS if split == "test_unseen" else _SEEN_PAIRS


def render_shape(colour: str, shape: str, *, diameter: float, center: tuple[float, float],
                 background: str, image_size: int = 64) -> np.ndarray:
    """uint8 (image_size, image_size, 3) image of one filled shape; sizes in pixels."""
    return np.asarray(_render(colour, shape, diameter, center, background, image_size))


def _render(colour, shape, diameter, center, background, image_size) -> Image.Image:
    if colour not in COLOURS:
        raise ValueError(f"colour must be one of {COLOUR_NAMES}, got {colour!r}")
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    if background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUND_NAMES}, got {background!r}")
    k = _SUPERSAMPLE
    half_width = diameter / 2
    half_height = half_width * math.sqrt(3) / 2 if shape == "triangle" else half_width
    # Only a window around the shape is drawn at k x; it starts on a multiple of k, so its
    # k x k boxes are those of a full-size canvas and the pixels come out the same.
    left = max(int(math.floor(center[0] - half_width)) - 1, 0)
    top = max(int(math.floor(center[1] - half_height)) - 1, 0)
    right = min(int(math.ceil(center[0] + half_width)) + 1, image_size)
    bottom = min(int(math.ceil(center[1] + half_height)) + 1, image_size)
    window = Image.new("RGB", ((right - left) * k, (bottom - top) * k), BACKGROUNDS[background])
    draw = ImageDraw.Draw(window)
    cx, cy = (center[0] - left) * k, (center[1] - top) * k
    half_width, half_height = half_width * k, half_height * k
    # Integer coordinates so that the result does not depend on PIL's float rounding.
    if shape == "triangle":
        points = [(cx - half_width, cy + half_height), (cx + half_width, cy + half_height),
                  (cx, cy - half_height)]
        draw.polygon([(round(x), round(y)) for x, y in points], fill=COLOURS[colour])
    else:
        box = [round(cx - half_width), round(cy - half_height),
               round(cx + half_width) - 1, round(cy + half_height) - 1]
        if shape == "circle":
            draw.ellipse(box, fill=COLOURS[colour])
        else:
            draw.rectangle(box, fill=COLOURS[colour])
    image = Image.new("RGB", (image_size, image_size), BACKGROUNDS[background])
    image.paste(window.reduce(k), (left, top))
    return image


def make_caption(colour: str, shape: str, size: str, position: str, background: str,
                 template: int) -> str:
    return _TEMPLATES[template].format(
        colour=colour, shape=shape, size=size, position=_POSITION_PHRASES[position],
        background=_BACKGROUND_PHRASES[background])


def _sample(seed: int, split: str, index: int, image_size: int) -> tuple[dict, Image.Image]:
    pairs = pairs_for_split(split)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _SPLIT_IDS[split], index])))
    colour, shape = pairs[rng.integers(len(pairs))]
    size = SIZES[rng.integers(len(SIZES))]
    position = POSITIONS[rng.integers(len(POSITIONS))]
    background = BACKGROUND_NAMES[rng.integers(len(BACKGROUND_NAMES))]
    template = int(rng.integers(len(_TEMPLATES)))
    diameter_fraction = _SIZE_FRACTION[size] * rng.uniform(1 - _SIZE_JITTER, 1 + _SIZE_JITTER)
    jitter = rng.uniform(-_POSITION_JITTER, _POSITION_JITTER, size=2)
    # Anchor so that the shape at its largest keeps a margin to the border.
    edge = _SIZE_FRACTION[size] * (1 + _SIZE_JITTER) / 2 + _EDGE_MARGIN + _POSITION_JITTER
    anchor_x, anchor_y = {"left": (edge, 0.5), "right": (1 - edge, 0.5), "top": (0.5, edge),
                          "bottom": (0.5, 1 - edge), "center": (0.5, 0.5)}[position]
    center = ((anchor_x + jitter[0]) * image_size, (anchor_y + jitter[1]) * image_size)
    image = _render(colour, shape, diameter_fraction * image_size, center, background, image_size)
    example = {"caption": make_caption(colour, shape, size, position, background, template),
               "colour": colour, "shape": shape, "size": size, "position": position,
               "background": background}
    return example, image


def generate_example(seed: int, split: str, index: int, image_size: int = 64) -> dict:
    """Example `index` of `split`: image (uint8 HWC), caption and attribute names."""
    example, image = _sample(seed, split, index, image_size)
    example["image"] = np.asarray(image)
    return example


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
    image_size: int = 64
    seed: int = 0
    num_train: int = 20000
    num_test: int = 1000
    num_test_unseen: int = 500

    def num_examples(self, split: str) -> int:
        return {"train": self.num_train, "test": self.num_test,
                "test_unseen": self.num_test_unseen}[split]


def shapes_config(*, image_size: int = 64, seed: int = 0, num_train: int = 20000,
                  num_test: int = 1000, num_test_unseen: int = 500) -> ShapesConfig:
    """A config whose name encodes every setting, so different settings never share a directory."""
    for argument, value in (("num_train", num_train), ("num_test", num_test),
                            ("num_test_unseen", num_test_unseen)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{argument} must be a positive int, got {value!r}")
    if not isinstance(image_size, (int, np.integer)) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    name = f"px{image_size}_seed{seed}_n{num_train}-{num_test}-{num_test_unseen}"
    return ShapesConfig(name=name, image_size=int(image_size), seed=int(seed), num_train=int(num_train),
                        num_test=int(num_test), num_test_unseen=int(num_test_unseen))


class Shapes(common.OfflineBuilder, skip_registration=True):
    """Captioned synthetic shapes; `Shapes(data_dir=..., config=shapes_config(...))`."""

    name = "shapes"
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [shapes_config()]

    def __init__(self, *, config: ShapesConfig | str | None = None, **kwargs):
        if isinstance(config, ShapesConfig) and config.name in self.builder_configs:
            default = self.builder_configs[config.name]
            if dataclasses.astuple(default) != dataclasses.astuple(config):
                raise ValueError(f"config {config.name!r} differs from the predefined config of that name")
            config = default  # tfds refuses an equal but distinct object under a predefined name
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.builder_config.image_size
        return tfds.core.DatasetInfo(
            builder=self,
            description="One filled shape on a plain background, with a caption and its attributes.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                "caption": tfds.features.Text(),
                "colour": tfds.features.ClassLabel(names=COLOUR_NAMES),
                "shape": tfds.features.ClassLabel(names=SHAPES),
                "size": tfds.features.ClassLabel(names=SIZES),
                "position": tfds.features.ClassLabel(names=POSITIONS),
                "background": tfds.features.ClassLabel(names=BACKGROUND_NAMES),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(split) for split in SPLITS}

    def _generate_examples(self, split):
        config = self.builder_config
        for index in range(config.num_examples(split)):
            example, image = _sample(config.seed, split, index, config.image_size)
            example["image"] = common.encode_png(image)
            yield index, example


def build_shapes(data_dir: str, **config_kwargs) -> Shapes:
    """Prepare (or reuse) the shapes dataset under `data_dir`; kwargs as `shapes_config`."""
    return common.prepare(lambda: Shapes(data_dir=data_dir, config=shapes_config(**config_kwargs)))


# ----------------------------------------------------------------------------------------------
# The judge.

_PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)
_MIN_CONTRAST = 40.0  # RGB distance below which nothing counts as a shape
_JUDGE_SUBSAMPLES = 4  # per pixel and axis, to give the ideal shapes fractional coverage
_JUDGE_BLURS = (0.0, 0.75, 1.5, 2.25)  # Gaussian widths in pixels at which ideals are compared
_JUDGE_RING = 3  # pixels around the detected region that still count towards its coverage
# RGB distance (0-255) above which an area reads as grainy. Gaussian noise of per-channel std s gives
# border_noise 1.54 s (median distance to the median colour, 3-d chi) and fill_noise 1.51 s (mean
# distance to the 3x3 median); 8 is s = 5, which a person sees on a flat colour. Renders give 0.
NOISE_LIMIT = 8.0


def _border(values: np.ndarray) -> np.ndarray:
    """The outermost ring of pixels of (H, W, ...) values, as (4 H + 4 W - 4 or so, ...)."""
    return np.concatenate([values[0], values[-1], values[1:-1, 0], values[1:-1, -1]])


def border_noise(image: np.ndarray) -> float:
    """Median RGB distance (0-255 units) of the border pixels of a uint8 (H, W, 3) image to the
    border's median colour: 0 on a flat background, ~1.54 s under Gaussian noise of std s."""
    border = _border(_check_image(image).astype(np.float64))
    return float(np.median(np.linalg.norm(border - np.median(border, axis=0), axis=-1)))


def fill_noise(image: np.ndarray) -> float:
    """Mean RGB distance (0-255 units) of the pixels well inside the most salient shape (its region
    with holes filled, eroded by 2 pixels) to the median of their 3x3 neighbourhood; 0 when no
    shape is found. Against the local median, not the fill's one colour, so that smooth shading
    counts as clean and only pixel-scale grain counts: ~1.51 s under Gaussian noise of std s. The
    mean, not the median, so that speckles on a few of the pixels count."""
    found = foreground_coverage(_check_image(image))
    return 0.0 if found is None else _fill_noise(*found)


def _fill_noise(coverage: np.ndarray, pixels: np.ndarray) -> float:
    core = ndi.binary_erosion(ndi.binary_fill_holes(coverage > 0.5), iterations=2)
    if core.sum() < 4:
        return 0.0
    # The erosion keeps every core pixel's 3x3 neighbourhood inside the shape.
    local_median = ndi.median_filter(pixels, size=(3, 3, 1), mode="nearest")
    return float(np.mean(np.linalg.norm(pixels[core] - local_median[core], axis=-1)))


def _check_image(image) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3 or min(image.shape[:2]) < 8:
        raise ValueError(f"image: expected (H, W, 3) with H, W >= 8, got shape {image.shape}")
    return image


def ideal_shape_coverage(coverage: np.ndarray) -> dict[str, np.ndarray]:
    """Per shape: the pixel coverage of that upright shape with the area and centroid of `coverage`."""
    area = float(coverage.sum())
    rows, cols = np.mgrid[:coverage.shape[0], :coverage.shape[1]].astype(np.float64)
    cy, cx = (coverage * rows).sum() / area, (coverage * cols).sum() / area
    k = _JUDGE_SUBSAMPLES
    offsets = (np.arange(k) + 0.5) / k - 0.5  # pixel j spans [j - 1/2, j + 1/2]
    y = rows[:, :, None, None] + offsets[:, None] - cy
    x = cols[:, :, None, None] + offsets[None, :] - cx
    radius = math.sqrt(area / math.pi)
    half_side = math.sqrt(area) / 2
    height = math.sqrt(area * math.sqrt(3))  # equilateral: area = height^2 / sqrt(3)
    apex = -2 * height / 3  # the centroid of a triangle sits 2/3 of its height below the apex
    inside = {
        "circle": x ** 2 + y ** 2 <= radius ** 2,
        "square": (np.abs(x) <= half_side) & (np.abs(y) <= half_side),
        "triangle": (y >= apex) & (y <= apex + height) & (np.abs(x) <= (y - apex) / math.sqrt(3)),
    }
    return {name: mask.mean(axis=(2, 3)) for name, mask in inside.items()}


def shape_scores(coverage: np.ndarray) -> dict[str, float]:
    """Soft intersection over union of a coverage map in [0, 1] with each ideal shape.

    Each ideal is also compared blurred at a few widths and keeps its best
    score, so that a blurred square still matches a square better than a circle.
    """
    ideals = ideal_shape_coverage(coverage)
    stacked = np.stack(list(ideals.values()))
    best = np.zeros(len(ideals))
    for sigma in _JUDGE_BLURS:
        blurred = ndi.gaussian_filter(stacked, sigma, mode="constant", axes=(1, 2)) if sigma else stacked
        iou = np.minimum(coverage, blurred).sum(axis=(1, 2)) / np.maximum(coverage, blurred).sum(axis=(1, 2))
        best = np.maximum(best, iou)
    return {name: float(score) for name, score in zip(ideals, best)}


def foreground_coverage(image: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(coverage in [0, 1], pixels) of the most salient region, both cropped to it plus a ring.

    None when nothing stands out. The background is the median of the border
    pixels; the region is the largest connected set of pixels more than half
    as far from it as the strongest contrast. A pixel blending
    foreground and background with weight a lies at distance a * contrast
    from the background, so distance / contrast estimates the covered fraction.
    """
    pixels = image.astype(np.float64)
    background = np.median(_border(pixels), axis=0)
    distance = np.linalg.norm(pixels - background, axis=-1)
    noise_floor = float(np.median(_border(distance)))
    strongest = float(np.percentile(distance, 99.5))
    if strongest - noise_floor < _MIN_CONTRAST:
        return None
    labels, count = ndi.label(distance > (strongest + noise_floor) / 2)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    if sizes.max() < 4:
        return None
    rows, cols = ndi.find_objects(labels)[sizes.argmax() - 1]
    # Pad by the ring so that dilation and blurred ideals have room on every side.
    pad = _JUDGE_RING
    region = np.pad(labels[rows, cols] == sizes.argmax(), pad)
    region = ndi.binary_fill_holes(region)
    window = (slice(rows.start, rows.stop + 2 * pad), slice(cols.start, cols.stop + 2 * pad))
    distance = np.pad(distance, pad, mode="edge")[window]
    pixels = np.pad(pixels, ((pad, pad), (pad, pad), (0, 0)), mode="edge")[window]
    contrast = float(np.median(distance[region]))
    coverage = np.clip((distance - noise_floor) / max(contrast - noise_floor, 1e-6), 0.0, 1.0)
    # Only the region and a ring around it count, so background noise adds nothing.
    coverage = np.where(ndi.binary_dilation(region, iterations=pad), coverage, 0.0)
    return coverage, pixels


def classify_shape_image(image: np.ndarray, max_noise: float | None = NOISE_LIMIT
                         ) -> tuple[str | None, str | None]:
    """(colour, shape) seen in a uint8 (H, W, 3) image; (None, None) when no shape stands out,
    or when its background or fill is grainy (`border_noise` or `fill_noise` above `max_noise`;
    None judges any image).

    Colour: the palette colour nearest to the median of the shape's core
    pixels. Shape: the best soft intersection over union with an ideal circle,
    square or upward triangle of the shape's area and centroid (moments barely
    move under noise or blur, unlike a bounding box).
    """
    image = _check_image(image)
    found = foreground_coverage(image)
    if found is None:
        return None, None
    coverage, pixels = found
    if max_noise is not None and (border_noise(image) > max_noise or _fill_noise(coverage, pixels) > max_noise):
        return None, None
    # The core (pixels at least 3/4 covered) carries the colour without edge blending.
    core = coverage > 0.75
    colour_value = np.median(pixels[core if core.any() else coverage > 0], axis=0)
    colour = COLOUR_NAMES[int(np.linalg.norm(_PALETTE - colour_value, axis=-1).argmin())]
    scores = shape_scores(coverage)
    return colour, max(scores, key=scores.get)
