"""The training step: masked next-token loss through the sequential or the diagonal schedule (full
backpropagation through time across segments; each segment, resp. each diagonal step,
rematerialised), gradient accumulation as a `lax.scan` over micro-batches, one Optax update.

The two schedules compute the same loss and gradients (tests/test_diagonal.py); the diagonal one
runs every layer of a diagonal in one grouped matmul (G = L at full load instead of G = 1).

Mixed precision: with `compute_dtype=jnp.bfloat16` the forward and backward run on a bf16 copy of
the (float32 master) weights, cast inside the differentiated function, so gradients, optimizer state
and updates stay float32 while the matmuls run in bf16 (on a Hopper GPU through the Pallas kernels,
which take 16-bit operands). The memory state stays float32 either way (SPEC §1.2)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from armt_jax.config import ArmtConfig, LlamaConfig
from armt_jax.schedules import schedule_forward

# An XLA GPU pass, off by default in XLA (openxla/xla#42808): a buffer that a loop overwrites
# completely starts as a plain allocation instead of zeros. JAX starts every scan output (the layer
# scan's residuals and weight gradients, per segment) as zeros. On an H200 a 1b training step
# (4096 tokens, kernels) took 0.1549 s with the pass, 0.1640 s without it in the run before; the
# same loss (eval/results/train_h200.md).
GPU_COMPILER_OPTIONS = {"xla_gpu_enable_dus_accumulator_zero_init_elimination": True}


# Bitwise reproducible steps on a GPU. By default XLA picks some GEMM algorithms by timing them
# when it compiles (a choice that can differ from process to process) and some backward ops
# accumulate with atomics (run to run); a 1b bf16 step (16384 tokens) then gave three different
# first steps in three processes, and a different gradient on a second call in the same process,
# while these options made all identical (eval/results/reproducibility_h200.md).
DETERMINISTIC_OPTIONS = {"xla_gpu_deterministic_ops": True}


def default_compiler_options(backend: str | None = None, deterministic: bool = False) -> dict:
    """The training step's XLA options on `backend` (default: JAX's default backend); with
    deterministic, also DETERMINISTIC_OPTIONS (on a GPU)."""
    if (backend or jax.default_backend()) != "gpu":
        return {}
    return {**GPU_COMPILER_OPTIONS, **(DETERMINISTIC_OPTIONS if deterministic else {})}


def counted_targets(batch: dict) -> jax.Array:
    """Targets that count in the loss: masked-in tokens after the first, within each length."""
    n = batch["tokens"].shape[1]
    inside = jnp.arange(n)[None, 1:] < batch["lengths"][:, None]
    return jnp.sum(batch["loss_mask"][:, 1:] * inside)


def make_train_step(cfg: LlamaConfig, armt: ArmtConfig, optimizer: optax.GradientTransformation,
                    *, accum_steps: int = 1, remat: bool = True, attn_impl="auto", gmm_impl="auto",
                    compute_dtype=None, compiler_options: dict | None = None,
                    schedule: str = "sequential"):
    """A jitted `step(params, opt_state, batch) -> (params, opt_state, metrics)`.

    batch: tokens [B, n], loss_mask [B, n], lengths [B]; B must divide by accum_steps. The loss is
    the mean over all counted targets of the batch, however it is split into micro-batches.
    compute_dtype: None computes in the weights' own dtype; a floating dtype (e.g. bf16) computes
    on a copy of the weights in it (module docstring).
    compiler_options: XLA options for compiling this step only (`jax.jit(compiler_options=...)`);
    None takes `default_compiler_options()` (GPU_COMPILER_OPTIONS on a GPU, none elsewhere), {}
    compiles with XLA's own defaults.
    schedule: "sequential" or "diagonal" (armt_jax.schedules), the forward the loss runs through.
    """
    forward = schedule_forward(schedule)
    if compute_dtype is not None and not jnp.issubdtype(compute_dtype, jnp.floating):
        raise ValueError(f"compute_dtype must be a floating dtype or None, got {compute_dtype!r}")

    def cast(params):
        if compute_dtype is None:
            return params
        return jax.tree.map(lambda a: a.astype(compute_dtype)
                            if jnp.issubdtype(a.dtype, jnp.floating) else a, params)

    def loss_sum(params, micro):
        out = forward(cast(params), micro["tokens"], cfg, armt, output="none",
                      compute_loss=True, loss_mask=micro["loss_mask"], lengths=micro["lengths"],
                      remat=remat, attn_impl=attn_impl, gmm_impl=gmm_impl)
        count = counted_targets(micro)
        return out.loss * count, count

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
    if compiler_options is None:
        compiler_options = default_compiler_options()

    @functools.partial(jax.jit, compiler_options=compiler_options or None)
    def step(params, opt_state, batch):
        B = batch["tokens"].shape[0]
        if B % accum_steps:
            raise ValueError(f"batch size {B} is not a multiple of accum_steps={accum_steps}")
        if accum_steps == 1:   # no float32 zeros and sum over every weight for a single batch
            (total, count), grads = grad_fn(params, batch)
        else:
            def accumulate(carry, mb):
                grads, total, count = carry
                (loss, c), g = grad_fn(params, mb)
                return (jax.tree.map(jnp.add, grads, g), total + loss, count + c), None

            micro = jax.tree.map(
                lambda a: a.reshape((accum_steps, B // accum_steps) + a.shape[1:]), batch)
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, total, count), _ = jax.lax.scan(
                accumulate, (zeros, jnp.zeros(()), jnp.zeros(())), micro)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {"loss": total / count, "targets": count,
                                   "grad_norm": optax.tree.norm(grads)}

    return step
