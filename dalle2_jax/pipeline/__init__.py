"""UnCLIP inference: generate, variations, interpolate, text_diff and inpaint over the trained stages.

  pipe = UnCLIPPipeline.from_pretrained("runs/demo/pipeline")
  images = pipe.generate(["a red circle"], seed=0, num_images_per_prompt=2)   # uint8 (2, H, W, 3)

The package: `inputs` (checking and converting user inputs), `stages` (a stage's module and
variables from its config), `storage` (the pipeline directory on disk), `unclip` (the
pipeline's operations), `runs` (its stage runs), `export` (training workdirs -> a pipeline directory).
"""
from dalle2_jax.pipeline.export import export_pipeline
from dalle2_jax.pipeline.inputs import (check_prompts, load_images, load_mask, slerp, square_image, square_mask,
                                        to_float, to_uint8)
from dalle2_jax.pipeline.stages import (REQUIRED_STAGES, Stage, abstract_variables, build_module,
                                        random_variables)
from dalle2_jax.pipeline.storage import CONFIG_FILE, FORMAT, PARAMS_SUBDIR, PIPELINE_FILE, TOKENIZER_SUBDIR, VERSION
from dalle2_jax.pipeline.runs import INVERSION_FIXED_POINT_ITERS
from dalle2_jax.pipeline.unclip import INVERTED_ETA, MAX_TEXT_DIFF_THETA, UnCLIPPipeline

__all__ = [
    "CONFIG_FILE", "FORMAT", "INVERSION_FIXED_POINT_ITERS", "INVERTED_ETA", "MAX_TEXT_DIFF_THETA", "PARAMS_SUBDIR",
    "PIPELINE_FILE", "REQUIRED_STAGES", "Stage", "TOKENIZER_SUBDIR", "UnCLIPPipeline", "VERSION",
    "abstract_variables", "build_module", "check_prompts", "export_pipeline", "load_images", "load_mask",
    "random_variables", "slerp", "square_image", "square_mask", "to_float", "to_uint8",
]
