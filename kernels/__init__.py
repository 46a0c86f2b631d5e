"""Kernels for armt-jax: the grouped matmul of the diagonal schedule.

``grouped_matmul(x, w, active=(lo, hi), impl="auto")``: see kernels/ops.py.
"""

from kernels.grouped_matmul_mgpu import TuningConfig
from kernels.ops import IMPLS, grouped_matmul, on_hopper
from kernels.reference import grouped_matmul_reference

__all__ = [
    "IMPLS",
    "TuningConfig",
    "grouped_matmul",
    "grouped_matmul_reference",
    "on_hopper",
]
