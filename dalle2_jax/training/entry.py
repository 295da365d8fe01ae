"""`run_train(stage, config_spec, workdir, overrides)`: what `dalle2-jax train` and train/train.py call."""
from __future__ import annotations

import importlib
import inspect
import os
import pkgutil
import sys
import traceback
from typing import Sequence

from dalle2_jax import config_util, sharding
from dalle2_jax.training import loop
from dalle2_jax.training.state import TrainState

STAGES = ("clip", "prior", "ar_prior", "decoder", "upsampler")


def known_stages() -> list[str]:
    """The stages of the design plus any task module present in dalle2_jax.tasks."""
    found = set(STAGES)
    try:
        import dalle2_jax.tasks as tasks_package

        found.update(m.name for m in pkgutil.iter_modules(tasks_package.__path__) if not m.name.startswith("_"))
    except ImportError:
        pass
    return sorted(found)


def make_task(stage: str, config, workdir: str | None = None, *, planning: bool = False):
    """`dalle2_jax.tasks.<stage>.make_task(config[, workdir=workdir])`: `workdir` goes to
    tasks whose make_task takes it (to keep files such as a trained tokenizer there).
    planning=True builds the task from the config alone, without its data (`dalle2-jax plan`),
    for the stages whose make_task offers it."""
    stages = known_stages()
    if not isinstance(stage, str) or not stage.isidentifier() or stage not in stages:
        raise ValueError(f"stage: expected one of {stages}, got {stage!r}")
    module_name = f"dalle2_jax.tasks.{stage}"
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name not in (module_name, "dalle2_jax.tasks"):
            raise
        raise ValueError(f"stage: {stage!r} has no task module {module_name} (known stages: {stages})") from None
    if not hasattr(module, "make_task"):
        raise ValueError(f"stage: {module_name} defines no make_task(config)")
    if planning:
        if "planning" not in inspect.signature(module.make_task).parameters:
            raise ValueError(f"stage: {stage!r} cannot be planned yet ({module_name}.make_task takes no "
                             "planning=True)")
        return module.make_task(config, planning=True)
    if workdir is not None and "workdir" in inspect.signature(module.make_task).parameters:
        return module.make_task(config, workdir=workdir)
    return module.make_task(config)


def run_train(stage: str, config_spec: str, workdir: str, overrides: Sequence[str] = ()) -> TrainState:
    """Load `config_spec` ("configs/FILE.py[:variant]") with `overrides`, build the
    stage's task and train it in `workdir` (resuming if it holds checkpoints)."""
    if not workdir:
        raise ValueError(f"workdir: expected a directory path, got {workdir!r}")
    distributed = sharding.maybe_initialize_distributed()
    try:
        config = config_util.load_config(config_spec, overrides)
        task = make_task(stage, config, workdir)
        return loop.train(task, config, workdir)
    except BaseException:
        if not distributed:
            raise
        # A failed process of a multi-process run exits now: at interpreter exit
        # jax.distributed would wait minutes at its shutdown barrier for peers that are
        # themselves blocked in a collective with this process.
        traceback.print_exc()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
