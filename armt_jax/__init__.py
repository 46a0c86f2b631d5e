"""armt-jax: the Associative Recurrent Memory Transformer in JAX, with diagonal batching.

Functional core (pure functions over explicit params, state and inputs):
    sequential_forward / diagonal_forward   run ARMT over a long input (same results)
    generate                                prefill + read-only-memory decoding
    llama_forward                           the plain full-attention Llama
User-facing Flax NNX module: ArmtModel.
"""

from armt_jax.armt import ArmtOutput
from armt_jax.config import LLAMA_3_2_1B, ArmtConfig, ConfigError, LlamaConfig, RopeScaling
from armt_jax.diagonal import diagonal_forward
from armt_jax.generate import generate
from armt_jax.layers import llama_forward
from armt_jax.memory import MemoryState
from armt_jax.model import ArmtModel, LlamaModel
from armt_jax.params import init_params
from armt_jax.sequential import sequential_forward

__all__ = ["LLAMA_3_2_1B", "ArmtConfig", "ArmtModel", "ArmtOutput", "ConfigError", "LlamaConfig",
           "LlamaModel", "MemoryState", "RopeScaling", "diagonal_forward", "generate", "init_params",
           "llama_forward", "sequential_forward"]
