"""Kernels for armt-jax: the grouped matmul of the diagonal schedule.

``grouped_matmul(x, w, active=(lo, hi), impl="auto")``: see kernels/ops.py;
``grouped_matmul_swiglu``: the fused gate/up projection and SwiGLU, kernels/swiglu.py.
Products of fewer than 64 rows (a decode step's) take kernels/split_k.py inside them.
"""

from kernels.grouped_matmul_mgpu import TuningConfig
from kernels.ops import IMPLS, grouped_matmul, kernel_path, on_hopper
from kernels.reference import grouped_matmul_reference
from kernels.swiglu import grouped_matmul_swiglu

__all__ = [
    "IMPLS",
    "TuningConfig",
    "grouped_matmul",
    "grouped_matmul_reference",
    "grouped_matmul_swiglu",
    "kernel_path",
    "on_hopper",
]
