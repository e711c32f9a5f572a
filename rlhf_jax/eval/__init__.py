"""rlhf_jax.eval: sampling-based evaluation of trained policies.

Modules: policy.py (load a policy run, sample, score with a task's judges, KL to a reference,
`evaluate_policies`), plots.py (the gold-reward-against-KL figure).
"""
