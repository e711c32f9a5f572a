"""The flagship: which methods reach the best gold reward at a given KL to the SFT policy (the DPO
paper's Figure 2) on the reviews task. PPO, RLOO and GRPO against the quickstart's reward
model; DPO (sigmoid) over a β grid, IPO and SimPO on its preference pairs; × 3 seeds.

    rlhf-jax sweep experiments/algorithm_frontier/sweep.py --out_dir runs/algorithm_frontier

Each algorithm is a gin file of this folder (a point's own GIN_FILE), so online-RL and
preference points share one sweep, one sweep.json and one report. β is traced: the DPO β grid
compiles once.
"""

from rlhf_jax.sweep.spec import Sweep, gin_files, product, seeds, sweep

HERE = "experiments/algorithm_frontier"
BETAS = [0.03, 0.1, 0.3, 1.0]

SWEEP = Sweep(
    gin_files=[],
    points=[
        *product(gin_files(f"{HERE}/ppo.gin", f"{HERE}/rloo.gin", f"{HERE}/grpo.gin"), seeds(3)),
        *product(gin_files(f"{HERE}/dpo.gin"), sweep("BETA", BETAS), seeds(3)),
        *product(gin_files(f"{HERE}/ipo.gin", f"{HERE}/simpo.gin"), seeds(3)),
    ],
    name="algorithm_frontier",
)
