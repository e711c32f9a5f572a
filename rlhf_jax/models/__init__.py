"""Models: `ModelConfig` and presets, the NNX transformer with KV cache, scalar heads
(reward and value models) and the value head on a policy's trunk.

Eager variable sharding is switched off for the whole package: parameters are placed explicitly
by `rlhf_jax.partitioning.sharded_init` (abstract init, then a jitted init with out_shardings),
and models built outside a mesh (unit tests, host-side tools) must not raise.
"""

from flax import nnx

nnx.use_eager_sharding(False)

from rlhf_jax.models.config import PRESETS, ModelConfig, model_config  # noqa: E402
from rlhf_jax.models.heads import ScalarModel  # noqa: E402
from rlhf_jax.models.transformer import Transformer  # noqa: E402
from rlhf_jax.models.value_head import ValueHead  # noqa: E402

__all__ = ["PRESETS", "ModelConfig", "ScalarModel", "Transformer", "ValueHead", "model_config"]
