"""Datasets (tfds builders writing array_record, no TensorFlow) and grain input pipelines.

- `shapes`: the synthetic captioned shapes set and its pixel judge `classify_shape_image`.
- `folders`: a folder of images with .txt / captions.csv / captions.jsonl captions.
- `webdataset`: img2dataset tar shards.
- `embeddings`: CLIP embedding datasets (clip-retrieval layout), writer and `EmbeddingSource`.
- `pipeline`: `make_image_text_iterator`, `make_embedding_iterator`.

Submodules are imported on first use (tensorflow_datasets takes seconds to import).
"""
import importlib

_SUBMODULES = ("common", "shapes", "folders", "webdataset", "embeddings", "pipeline")
_EXPORTS = {
    "build_shapes": "shapes", "Shapes": "shapes", "shapes_config": "shapes",
    "classify_shape_image": "shapes",
    "build_image_folder": "folders", "ImageFolder": "folders",
    "build_webdataset": "webdataset", "WebDataset": "webdataset",
    "write_embedding_dataset": "embeddings", "EmbeddingWriter": "embeddings",
    "EmbeddingSource": "embeddings",
    "make_image_text_iterator": "pipeline", "make_embedding_iterator": "pipeline",
}


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
