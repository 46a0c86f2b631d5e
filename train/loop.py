"""The training loop: progress bar, JSONL metrics, Orbax checkpoints with the configs beside."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import optax
from tqdm import tqdm

from armt_jax.checkpoint import save_checkpoint
from armt_jax.config import ArmtConfig, LlamaConfig
from train.step import make_train_step


def fit(params: dict, cfg: LlamaConfig, armt: ArmtConfig, batches: Iterator[dict], *,
        steps: int, optimizer: optax.GradientTransformation, accum_steps: int = 1,
        out_dir: str | Path | None = None, checkpoint_every: int = 0,
        progress: bool = True, compute_dtype=None, schedule: str = "sequential",
        compiler_options: dict | None = None) -> tuple[dict, list[dict]]:
    """Train for `steps` steps. Writes `out_dir/metrics.jsonl` (one line per step) and Orbax
    checkpoints `out_dir/step_{k}` every `checkpoint_every` steps and at the end.
    compute_dtype, schedule, compiler_options: see `train.step.make_train_step` (bf16: mixed
    precision; the sequential or the diagonal schedule; XLA options of the step).
    A batch of a shape not seen before compiles the step for it first (minutes for the diagonal
    schedule on a GPU; `armt --compilation-cache` keeps the programs for later runs): the bar
    says so while it waits, and that step's metrics carry `includes_compile: true`, so its
    `seconds` are not read as a step time."""
    step_fn = make_train_step(cfg, armt, optimizer, accum_steps=accum_steps,
                              compute_dtype=compute_dtype, schedule=schedule,
                              compiler_options=compiler_options)
    opt_state = optimizer.init(params)
    out_dir = Path(out_dir) if out_dir is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    history, shapes_seen = [], set()
    bar = tqdm(range(1, steps + 1), desc="train", disable=not progress)
    for step in bar:
        batch = next(batches)
        shape = tuple(batch["tokens"].shape)
        new_shape = shape not in shapes_seen
        if new_shape:
            shapes_seen.add(shape)
            bar.set_postfix_str(f"compiling the step for a {shape[0]} x {shape[1]} batch")
        t0 = time.perf_counter()
        params, opt_state, metrics = step_fn(params, opt_state, batch)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        metrics.update(step=step, seconds=time.perf_counter() - t0,
                       tokens=int(batch["lengths"].sum()), includes_compile=new_shape)
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}")
        if out_dir is not None:
            with (out_dir / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if step == steps or (checkpoint_every and step % checkpoint_every == 0):
                save_checkpoint(out_dir / f"step_{step}", params, cfg, armt, overwrite=True)
    return params, history
