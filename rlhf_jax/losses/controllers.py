"""Small pieces of online-RL state and their pure updates: KL controller, reward statistics.

This module owns the state that an RL iteration carries from one rollout to the next besides
the parameters: the KL coefficient (fixed, or the adaptive controller of Ziegler et al. 2019),
the running mean and variance of rewards used to normalise them (merged batch by batch with the
parallel update of Chan et al.), and the running-mean REINFORCE baseline. Each state is a small
`flax.struct` pytree of float32 scalars, so it lives in the train state, is checkpointed with
it, and a resumed run continues bitwise; each update is a pure function with traced
hyperparameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array
ArrayLike = jax.typing.ArrayLike

KL_CONTROLLERS: tuple[str, ...] = ("fixed", "adaptive")


def _f32(x: ArrayLike) -> Array:
    return jnp.asarray(x, jnp.float32)


@struct.dataclass
class KLControllerState:
    """The current KL coefficient beta (float32 scalar)."""

    coef: Array

    @classmethod
    def create(cls, init_coef: ArrayLike) -> KLControllerState:
        return cls(coef=_f32(init_coef))


def update_kl_controller(
    state: KLControllerState,
    observed_kl: ArrayLike,
    n_steps: ArrayLike,
    *,
    kind: str,
    target: ArrayLike,
    horizon: ArrayLike,
    max_error: ArrayLike = 0.2,
) -> KLControllerState:
    """The KL coefficient after one rollout.

    "fixed" keeps beta. "adaptive" is the proportional controller of Ziegler et al. 2019,
    "Fine-Tuning Language Models from Human Preferences":
    e = clip(KL / KL_target - 1, -0.2, 0.2), beta <- beta * (1 + e * n_steps / horizon),
    which moves log beta towards the value that holds the observed KL at the target, at a rate
    of about n_steps / horizon per update. verl, OpenRLHF and TRL use the same rule.

    Args:
      state: the controller state.
      observed_kl: this rollout's mean sequence KL to the reference (nats per completion).
      n_steps: number of samples in the rollout (traceable).
      kind: "fixed" or "adaptive" (static).
      target: KL_target (traceable).
      horizon: horizon in samples (traceable).
      max_error: the clip of the proportional error (traceable; 0.2 in the paper).

    Returns:
      The new state.

    Raises:
      ValueError: unknown `kind`.
    """
    if kind == "fixed":
        return state
    if kind != "adaptive":
        raise ValueError(f"Unknown KL controller {kind!r}; known: {KL_CONTROLLERS}")
    c = _f32(max_error)
    error = jnp.clip(_f32(observed_kl) / _f32(target) - 1.0, -c, c)
    return KLControllerState(coef=state.coef * (1.0 + error * _f32(n_steps) / _f32(horizon)))


@struct.dataclass
class RunningMoments:
    """Count, mean and sum of squared deviations (M2) of every value seen so far (float32)."""

    count: Array
    mean: Array
    m2: Array

    @classmethod
    def create(cls) -> RunningMoments:
        zero = jnp.zeros((), jnp.float32)
        return cls(count=zero, mean=zero, m2=zero)

    @property
    def var(self) -> Array:
        """Sample variance (ddof = 1); 1 until two values have been seen, so normalising by it
        is the identity at the start rather than a division by zero."""
        return jnp.where(self.count > 1, self.m2 / jnp.maximum(self.count - 1.0, 1.0), 1.0)

    @property
    def std(self) -> Array:
        return jnp.sqrt(self.var)


def update_moments(
    state: RunningMoments, values: Array, mask: Array | None = None
) -> RunningMoments:
    """Merges a batch of values into running moments.

    The batch's own count, mean and M2 are combined with the state by the parallel update of
    Chan, Golub & LeVeque 1979, "Updating Formulae and a Pairwise Algorithm for Computing Sample
    Variances": with delta = mean_b - mean_a and n = n_a + n_b,
    mean = mean_a + delta * n_b / n and M2 = M2_a + M2_b + delta^2 * n_a * n_b / n. This is
    Welford's update generalised from one value to a batch, and stays accurate where the naive
    sum of squares cancels.

    Args:
      state: the running moments.
      values: any shape.
      mask: optional weights (1 = include), same shape as `values`; padding rows use 0.

    Returns:
      The updated moments (unchanged when the mask is empty).
    """
    x = _f32(values)
    w = jnp.ones_like(x) if mask is None else (jnp.asarray(mask) != 0).astype(jnp.float32)
    x = jnp.where(w > 0, x, 0.0)
    n_b = jnp.sum(w)
    mean_b = jnp.sum(x * w) / jnp.maximum(n_b, 1.0)
    m2_b = jnp.sum(w * jnp.square(x - mean_b))
    n = state.count + n_b
    delta = mean_b - state.mean
    frac_b = n_b / jnp.maximum(n, 1.0)
    return RunningMoments(
        count=n,
        mean=state.mean + delta * frac_b,
        m2=state.m2 + m2_b + jnp.square(delta) * state.count * frac_b,
    )


def normalize_with_moments(
    state: RunningMoments, values: Array, *, shift_mean: bool = True, eps: ArrayLike = 1e-8
) -> Array:
    """(values - mean) / (std + eps) with the running statistics (OpenRLHF `normalize_reward`).

    Args:
      state: running moments, usually already updated with this batch.
      values: any shape.
      shift_mean: subtract the running mean (static); False only rescales.
      eps: added to the std (traceable).

    Returns:
      Normalised values, float32.
    """
    x = _f32(values)
    if shift_mean:
        x = x - state.mean
    return x / (state.std + _f32(eps))


@struct.dataclass
class RunningMean:
    """An exponential moving average of rewards, the REINFORCE baseline (float32 scalars)."""

    value: Array
    initialised: Array  # bool: whether a batch has been seen

    @classmethod
    def create(cls) -> RunningMean:
        return cls(value=jnp.zeros((), jnp.float32), initialised=jnp.zeros((), bool))


def running_mean_update(
    state: RunningMean, scores: Array, *, decay: ArrayLike, mask: Array | None = None
) -> RunningMean:
    """The moving-average baseline after a batch: b <- decay * b + (1 - decay) * mean(scores).

    The first batch sets b to its mean. Use the baseline from *before* the update for the
    batch's own advantages, so the baseline does not depend on the sample it is subtracted from
    and the gradient estimate stays unbiased (Williams 1992, "Simple Statistical
    Gradient-Following Algorithms for Connectionist Reinforcement Learning").

    Args:
      state: the baseline state.
      scores: this batch's sequence rewards.
      decay: EMA decay in [0, 1) (traceable).
      mask: optional 0/1 weights (padding rows 0).

    Returns:
      The new state (unchanged when the mask is empty).
    """
    x = _f32(scores)
    w = jnp.ones_like(x) if mask is None else (jnp.asarray(mask) != 0).astype(jnp.float32)
    n = jnp.sum(w)
    batch_mean = jnp.sum(jnp.where(w > 0, x, 0.0) * w) / jnp.maximum(n, 1.0)
    d = _f32(decay)
    blended = jnp.where(state.initialised, d * state.value + (1.0 - d) * batch_mean, batch_mean)
    return RunningMean(
        value=jnp.where(n > 0, blended, state.value), initialised=state.initialised | (n > 0)
    )
