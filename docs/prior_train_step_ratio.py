"""Side by side: CPU seconds of one jitted value_and_grad step of the demo's diffusion prior and AR prior (batch 64)."""
import time
from pathlib import Path

import jax

from dalle2_jax.pipeline.storage import read_config
from dalle2_jax.tasks import ar_prior, prior

tasks = {}
for name, module, workdir in (("diffusion", prior, "runs/demo/prior"), ("ar", ar_prior, "runs/ar34/ar_prior")):
    config = read_config(Path(workdir) / "config.json", "workdir")
    config.data.train_dir, config.data.eval_dirs = "runs/demo/embeddings/train", {}
    task = module.make_task(config, workdir=workdir)
    batch = next(task.train_iterator(seed=0, process_index=0, process_count=1, per_process_batch=64))
    params = jax.jit(task.init_params)(jax.random.key(0), batch)
    step = jax.jit(jax.value_and_grad(lambda p, b, r, task=task: task.loss(p, b, r)[0]))
    jax.block_until_ready(step(params, batch, jax.random.key(0)))
    tasks[name] = (step, params, batch)
cpu = {name: 0.0 for name in tasks}
for round_ in range(5):
    for name, (step, params, batch) in tasks.items():
        start = time.process_time()
        for i in range(4):
            jax.block_until_ready(step(params, batch, jax.random.key(i)))
        cpu[name] += time.process_time() - start
print({name: round(value / 20, 4) for name, value in cpu.items()}, "CPU s per step; ratio ar/diffusion",
      round(cpu["ar"] / cpu["diffusion"], 2))
