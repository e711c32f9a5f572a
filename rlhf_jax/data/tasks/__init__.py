"""rlhf_jax.data.tasks: built-in offline tasks (corpus generators and their gold judges).

`reviews` builds the synthetic reviews corpus, tokenizer and prompt sets; `judges` scores
decoded text with VADER sentiment and profanity-check offensiveness and defines `gold_reward`.
"""

from rlhf_jax.data.tasks.judges import JUDGES, gold_reward, score_texts
from rlhf_jax.data.tasks.reviews import ReviewsTask, build_reviews_task

__all__ = ["JUDGES", "ReviewsTask", "build_reviews_task", "gold_reward", "score_texts"]
