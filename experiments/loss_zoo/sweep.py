"""The DPO family's loss types at their usual hyperparameters × 3 seeds on the reviews task.

    rlhf-jax sweep experiments/loss_zoo/sweep.py --out_dir runs/loss_zoo

Hyperparameters are the papers' (or TRL's) defaults; see gin/algorithms/dpo.gin for what each
type reads. Each type is a separate program (a static choice), so the sweep compiles once per
type; the seeds of a type reuse its compiled programs.
"""

from rlhf_jax.sweep.spec import Sweep, product, seeds

LOSSES = [
    {"DPO_LOSS_TYPE": "sigmoid", "BETA": 0.1},  # DPO (Rafailov et al. 2023)
    {"DPO_LOSS_TYPE": "sigmoid", "BETA": 0.1, "LABEL_SMOOTHING": 0.1},  # cDPO
    {"DPO_LOSS_TYPE": "robust", "BETA": 0.1, "LABEL_SMOOTHING": 0.1},  # rDPO
    {"DPO_LOSS_TYPE": "hinge", "BETA": 0.1},  # SLiC-HF
    {"DPO_LOSS_TYPE": "ipo", "BETA": 0.1},  # IPO
    {"DPO_LOSS_TYPE": "exo_pair", "BETA": 0.1, "LABEL_SMOOTHING": 1e-3},  # EXO
    {"DPO_LOSS_TYPE": "nca_pair", "BETA": 0.1},  # NCA
    {"DPO_LOSS_TYPE": "bco_pair", "BETA": 0.1},  # BCO
    {"DPO_LOSS_TYPE": "sppo_hard", "BETA": 0.1},  # SPPO
    {"DPO_LOSS_TYPE": "aot", "BETA": 0.1},  # AOT paired
    {"DPO_LOSS_TYPE": "aot_unpaired", "BETA": 0.1},  # AOT unpaired
    {"DPO_LOSS_TYPE": "apo_zero", "BETA": 0.1},  # APO-zero
    {"DPO_LOSS_TYPE": "apo_down", "BETA": 0.1},  # APO-down
    {"DPO_LOSS_TYPE": "discopop", "BETA": 0.05, "DISCOPOP_TAU": 0.05},  # DiscoPOP
    {"DPO_LOSS_TYPE": "sigmoid_norm", "BETA": 0.1},  # length-normalised DPO
    {"DPO_LOSS_TYPE": "simpo", "BETA": 2.0, "SIMPO_GAMMA": 1.0},  # SimPO (gamma/beta = 0.5)
    {"DPO_LOSS_TYPE": "orpo", "ORPO_LAMBDA": 0.1},  # ORPO
]

SWEEP = Sweep(
    gin_files=["experiments/loss_zoo/loss_zoo.gin"],
    points=product(LOSSES, seeds(3)),
    name="loss_zoo",
)
