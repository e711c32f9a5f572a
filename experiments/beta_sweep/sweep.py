"""DPO (sigmoid) over a β grid × 3 seeds on the reviews task (15 runs of 300 steps).

rlhf-jax sweep experiments/beta_sweep/sweep.py --out_dir runs/beta_sweep
"""

from rlhf_jax.sweep.spec import Sweep, product, seeds, sweep

BETAS = [0.01, 0.03, 0.1, 0.3, 1.0]

SWEEP = Sweep(
    gin_files=["experiments/beta_sweep/beta_sweep.gin"],
    points=product(sweep("BETA", BETAS), seeds(3)),
    name="beta_sweep",
)
