"""rlhf_jax.ops: shared pure array ops (log-probs, masked statistics, KL estimators)."""

from rlhf_jax.ops.kl import KL_KINDS, kl_penalty, sequence_kl
from rlhf_jax.ops.logprobs import (
    chunked_token_logprobs,
    completion_logprobs,
    entropy_from_logits,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
    sequence_logprobs,
    token_logprobs,
)

__all__ = [
    "KL_KINDS",
    "chunked_token_logprobs",
    "completion_logprobs",
    "entropy_from_logits",
    "kl_penalty",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "sequence_kl",
    "sequence_logprobs",
    "token_logprobs",
]
