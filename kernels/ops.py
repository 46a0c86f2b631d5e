"""Public grouped matmul op: dispatch between implementations, and its VJP.

``grouped_matmul(x, w, active=(lo, hi))`` computes ``out[g] = x[g] @ w[g]`` for
the groups ``lo <= g < hi`` and zeros for every other group; ``lo`` and ``hi``
may be traced, so one compiled program serves every active range. With
``weight_offset=o`` the weights may hold more groups than x and group g uses
``w[g + o]`` (o traced too): a window of slots of the diagonal schedule reads
its layers straight from the full stacked weights, with no copy on the kernel
path.

Implementations (``impl``):

* ``"xla"``: ``jnp.einsum`` over all groups, then idle groups selected to zero
  (the oracle; idle groups cost full price here).
* ``"pallas"``: the Hopper Mosaic GPU kernel (grouped_matmul_mgpu.py); idle
  groups launch no matmul work. Raises ValueError for problems it cannot serve
  and off a Hopper GPU.
* ``"interpret"``: the same Mosaic GPU kernel run by Pallas' GPU interpret mode
  (on CPU; small default tiles), for tests.
* ``"auto"``: ``"pallas"`` on a Hopper GPU when the kernel serves the problem
  (bf16/f16, k and n multiples of 64, ...), ``"xla"`` otherwise. That includes
  plain single-group products (the sequential schedule's and a training
  step's), although cuBLAS runs most of them faster in isolation (0.58-0.97x,
  eval/results/grouped_matmul_h200.md): inside the layer scan XLA copies each
  operand slice out of the stacked weights and residuals before a cuBLAS call,
  which the kernel reads in place, and a whole training step measured faster
  with the kernel than with cuBLAS for them (eval/results/train_h200.md).

Without ``active`` the XLA path has no select over groups (which XLA would fuse
into a slower Triton GEMM): the plain einsum, after a slice of the weights where
``weight_offset`` is given.

Products of fewer than 64 rows (a decode step's, one row per sequence) take the
kernel with their k split over its groups (``kernels/split_k.py``: float32
partials, summed after) on the kernel paths, reading a layer of stacked weights
in place; "auto" sends their transposed (backward) products to XLA.

Gradients (``jax.custom_vjp``): ``dx = dy @ w^T`` and ``dw[g + o] = x[g]^T @
dy[g]`` are two more grouped matmuls over the same active range (idle groups,
and weight groups outside the window, get zero gradient), run by the kernel with
transposed operand views (no transposed copies). Under ``"pallas"`` /
``"interpret"`` a backward product the kernel cannot serve falls back to XLA;
the range and offset get no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels import grouped_matmul_mgpu as mgpu_kernel
from kernels import split_k
from kernels.reference import grouped_matmul_reference

IMPLS = ("auto", "pallas", "xla", "interpret")

# Small tiles keep GPU interpret mode (which simulates every TMA copy and
# wgmma on the CPU) fast; the code path is the same as with the GPU tiles.
INTERPRET_CONFIG = mgpu_kernel.TuningConfig(
    tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=2, epi_tile_m=64, epi_tile_n=64
)
INTERPRET_NUM_SMS = 4


def on_hopper() -> bool:
    """True when the default device is a Hopper (sm_90) GPU."""
    try:
        dev = jax.devices()[0]
    except RuntimeError:  # pragma: no cover
        return False
    return dev.platform == "gpu" and str(getattr(dev, "compute_capability", "")).startswith("9.")


def kernel_path(impl: str) -> bool:
    """Whether ``impl`` runs products on the Mosaic GPU kernel where it serves them ("interpret"
    anywhere, "pallas" / "auto" on a Hopper GPU): there weights stacked [L, ...] are read in
    place through ``weight_offset``, where XLA copies the layer out."""
    return impl == "interpret" or (impl in ("auto", "pallas") and on_hopper())


def _check_impl(impl: str) -> None:
    if impl not in IMPLS:
        raise ValueError(f"grouped_matmul: unknown impl {impl!r}; expected one of {IMPLS}")


def _check_operands(x, w, offset: bool) -> None:
    groups_ok = w.shape[0] >= x.shape[0] if offset else w.shape[0] == x.shape[0]
    if x.ndim != 3 or w.ndim != 3 or not groups_ok or (x.shape[2] != w.shape[1]):
        expected = "[Gw >= G, k, n] (weight_offset given)" if offset else "[G, k, n]"
        raise ValueError(
            f"grouped_matmul: expected x [G, m, k] and w {expected}, got x"
            f" {tuple(x.shape)} and w {tuple(w.shape)}"
        )
    for name, arr in (("x", x), ("w", w)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(
                f"grouped_matmul: {name} must be floating point, got {arr.dtype}"
                f" (x {tuple(x.shape)}, w {tuple(w.shape)})"
            )


def _kernel_config(impl, config):
    if config is not None:
        return config
    return INTERPRET_CONFIG if impl == "interpret" else None


def _dispatch(a, b, bounds, *, transpose_lhs, transpose_rhs, out_dtype, out_groups, impl,
              config, strict, all_groups=False):
    """One grouped product ``out[g + out_off] = op(a[g]) @ op(b[g + b_off])`` on the path
    ``impl`` asks for; bounds = (lo, hi, b_off, out_off). all_groups (static): every group
    active, so the XLA path needs no mask (a plain einsum where there are no offsets)."""
    if impl != "xla" and config is None and not (transpose_lhs or transpose_rhs):
        out = _split_k(a, b, bounds, out_dtype, impl)
        if out is not None:
            return out
    if impl != "xla":
        cfg = _kernel_config(impl, config)
        if cfg is None:
            dims = mgpu_kernel.problem_dims(a.shape, b.shape, transpose_lhs, transpose_rhs)
            cfg = mgpu_kernel.select_config(
                *dims, transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs,
                dtype=jnp.promote_types(a.dtype, b.dtype))
        if _kernel_serves(a, b, out_dtype, transpose_lhs, transpose_rhs, impl, cfg, strict):
            return _run_kernel(a, b, bounds, transpose_lhs, transpose_rhs, out_groups, impl, cfg)
    return grouped_matmul_reference(
        a, b, bounds, transpose_lhs=transpose_lhs, transpose_rhs=transpose_rhs,
        out_dtype=out_dtype, out_groups=out_groups, masked=not all_groups)


def _split_k(a, b, bounds, out_dtype, impl):
    """A forward product of fewer than split_k.MAX_ROWS rows on the kernel, k split over its
    groups (kernels/split_k.py); None where that path does not serve it ("auto": off Hopper)."""
    interpret = impl == "interpret"
    cfg = INTERPRET_CONFIG if interpret else split_k.CONFIG
    num_sms = INTERPRET_NUM_SMS if interpret else mgpu_kernel.num_sms_of_device()
    dtype = jnp.promote_types(a.dtype, b.dtype)
    # Off Hopper "pallas" falls through to the plain path, whose check raises naming the device.
    if not kernel_path(impl) or split_k.unsupported_reason(a.shape, b.shape, dtype, cfg,
                                                           num_sms, interpret) is not None:
        return None
    params = dict(interpret=_interpret_params()) if interpret else {}
    return split_k.split_k_matmul(a.astype(dtype), b.astype(dtype), bounds, out_dtype=out_dtype,
                                  config=cfg, num_sms=num_sms, **params)


def _interpret_params():
    from jax.experimental.pallas import mosaic_gpu as plgpu

    return plgpu.InterpretGPUParams()


def _kernel_serves(a, b, out_dtype, transpose_lhs, transpose_rhs, impl, cfg, strict,
                   swiglu=False) -> bool:
    """Whether the Mosaic GPU kernel runs this product ("auto": only on Hopper; "pallas" /
    "interpret" with `strict`: a product it cannot serve is an error)."""
    dtype = jnp.promote_types(a.dtype, b.dtype)
    reason = mgpu_kernel.unsupported_reason(
        a.shape, b.shape, dtype, out_dtype, transpose_lhs=transpose_lhs,
        transpose_rhs=transpose_rhs, config=cfg, interpret=impl == "interpret", swiglu=swiglu)
    if reason is None and jnp.dtype(out_dtype) != dtype:
        # The kernel can write float32 (split_k's partials), but only that path is tested so.
        reason = f"output dtype {jnp.dtype(out_dtype)} != input dtype {dtype}"
    if impl == "auto":
        m = mgpu_kernel.problem_dims(a.shape, b.shape, transpose_lhs, transpose_rhs, swiglu)[1]
        return reason is None and mgpu_kernel.fills_tile(m, cfg) and on_hopper()
    op = "grouped_matmul_swiglu" if swiglu else "grouped_matmul"
    if reason is not None and strict:
        raise ValueError(
            f"{op}(impl={impl!r}): the Mosaic GPU kernel cannot serve"
            f" a {tuple(a.shape)} {a.dtype} @ b {tuple(b.shape)} {b.dtype}"
            f" -> {jnp.dtype(out_dtype)} (transpose_lhs={transpose_lhs},"
            f" transpose_rhs={transpose_rhs}): {reason}"
        )
    if reason is None and impl == "pallas" and not on_hopper():
        # Otherwise Pallas fails in lowering with a message that names neither op nor fix.
        raise ValueError(
            f"{op}(impl='pallas'): the Mosaic GPU kernel needs a Hopper (sm_90) GPU, and the"
            f" default device is {jax.devices()[0].device_kind!r}; use impl='auto' (XLA off"
            f" Hopper) or impl='interpret' (the kernel simulated on the CPU)"
        )
    return reason is None


def _run_kernel(a, b, bounds, transpose_lhs, transpose_rhs, out_groups, impl, cfg,
                swiglu=False):
    kernel_dtype = jnp.promote_types(a.dtype, b.dtype)
    interpret = None
    num_sms = None
    if impl == "interpret":
        interpret = _interpret_params()
        num_sms = INTERPRET_NUM_SMS
    return mgpu_kernel.grouped_matmul_mgpu(
        a.astype(kernel_dtype),
        b.astype(kernel_dtype),
        bounds,
        transpose_lhs=transpose_lhs,
        transpose_rhs=transpose_rhs,
        config=cfg,
        out_groups=out_groups,
        num_sms=num_sms,
        interpret=interpret,
        swiglu=swiglu,
    )


def _bounds(lo, hi, b_off, out_off):
    return jnp.stack([lo, hi, b_off, out_off]).astype(jnp.int32)


# bounds = (lo, hi, weight_offset): int32[3], traced. all_groups (static): active was not
# given (every group computes: no mask on the XLA path).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _gmm(impl, out_dtype, config, all_groups, x, w, bounds):
    lo, hi, off = bounds
    return _dispatch(x, w, _bounds(lo, hi, off, 0), transpose_lhs=False, transpose_rhs=False,
                     out_dtype=out_dtype, out_groups=x.shape[0], impl=impl, config=config,
                     strict=True, all_groups=all_groups)


def _gmm_fwd(impl, out_dtype, config, all_groups, x, w, bounds):
    return _gmm(impl, out_dtype, config, all_groups, x, w, bounds), (x, w, bounds)


def _gmm_bwd(impl, out_dtype, config, all_groups, res, dy):
    del out_dtype
    x, w, bounds = res
    lo, hi, off = bounds
    if impl != "xla":
        # The kernels take one input dtype: run the backward in the inputs'
        # precision (float32 accumulation inside), as mixed-precision training does.
        dy = dy.astype(jnp.promote_types(x.dtype, w.dtype))
    # dx[g] = dy[g] @ w[g + off]^T: B = w read as [Gw, N=k, K=n].
    dx = _dispatch(dy, w, _bounds(lo, hi, off, 0), transpose_lhs=False, transpose_rhs=True,
                   out_dtype=x.dtype, out_groups=x.shape[0], impl=impl, config=config,
                   strict=False, all_groups=all_groups)
    # dw[g + off] = x[g]^T @ dy[g]: A = x read as [G, K=m, M=k]; ragged m is the
    # contraction dim here (TMA zero-fills past the end). Weight groups outside
    # the window get zeros.
    dw = _dispatch(x, dy, _bounds(lo, hi, 0, off), transpose_lhs=True, transpose_rhs=False,
                   out_dtype=w.dtype, out_groups=w.shape[0], impl=impl, config=config,
                   strict=False, all_groups=all_groups)
    return dx, dw, np.zeros(bounds.shape, dtype=jax.dtypes.float0)


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def active_range_and_offset(x, w, active, weight_offset):
    """(lo, hi, offset) as int32 scalars: ``active`` (None = all groups) clipped to
    [0, G], the weight offset (None = 0) to [0, Gw - G]."""
    num_groups = x.shape[0]
    if active is None:
        lo, hi = 0, num_groups
    else:
        try:
            lo, hi = active
        except (TypeError, ValueError):
            raise ValueError(
                f"grouped_matmul: active must be None or a pair (lo, hi), got {active!r}"
            ) from None
    lo = jnp.clip(jnp.asarray(lo, jnp.int32), 0, num_groups)
    hi = jnp.clip(jnp.asarray(hi, jnp.int32), lo, num_groups)
    if lo.ndim or hi.ndim:
        raise ValueError(
            f"grouped_matmul: lo and hi must be scalars, got shapes {lo.shape}, {hi.shape}"
        )
    offset = jnp.asarray(0 if weight_offset is None else weight_offset, jnp.int32)
    if offset.ndim:
        raise ValueError(f"grouped_matmul: weight_offset must be a scalar, got shape {offset.shape}")
    return lo, hi, jnp.clip(offset, 0, w.shape[0] - num_groups)


def grouped_matmul(
    x,
    w,
    active=None,
    *,
    weight_offset=None,
    impl: str = "auto",
    preferred_element_type=None,
    config: mgpu_kernel.TuningConfig | None = None,
):
    """Grouped matmul ``out[g] = x[g] @ w[g]`` over an active group range.

    Args:
      x: [G, m, k], bfloat16 (float16/float32 accepted).
      w: [G, k, n], same dtype as x for the kernels; with ``weight_offset``
        [Gw, k, n] with Gw >= G.
      active: ``(lo, hi)`` int32 scalars, possibly traced: groups
        ``lo <= g < hi`` are computed, all others produce zeros (and get zero
        gradient). ``None`` means all groups. Values are clipped to [0, G].
      weight_offset: int32 scalar, possibly traced: group g uses
        ``w[g + weight_offset]``; clipped to [0, Gw - G]. Default 0.
      impl: "auto" | "pallas" | "xla" | "interpret" (module docstring).
      preferred_element_type: output dtype (default x.dtype). The kernels only
        produce x.dtype; anything else goes to XLA under "auto".
      config: a grouped_matmul_mgpu.TuningConfig overriding the per-shape choice.

    Returns:
      [G, m, n] in ``preferred_element_type`` (default x.dtype); float32
      accumulation throughout.
    """
    _check_impl(impl)
    _check_operands(x, w, weight_offset is not None)
    lo, hi, offset = active_range_and_offset(x, w, active, weight_offset)
    bounds = jnp.stack([lo, hi, offset])
    out_dtype = jnp.dtype(preferred_element_type or x.dtype)
    all_groups = active is None
    return _gmm(impl, out_dtype, config, all_groups, x, w, bounds)
