"""rlhf_jax.data.tasks: built-in offline tasks (corpus generators and their gold judges).

`reviews` builds the synthetic reviews corpus, tokenizer and prompt sets; `judges` scores
decoded text with VADER sentiment and profanity-check offensiveness and defines `gold_reward`.
`TASKS` names each task; a task class provides its judges (`judge`, `gold_reward`), which the
commands use when told a task's name.
"""

from rlhf_jax.data.tasks.judges import JUDGES, gold_reward, score_texts
from rlhf_jax.data.tasks.reviews import ReviewsTask, build_reviews_task

TASKS: dict[str, type[ReviewsTask]] = {"reviews": ReviewsTask}

__all__ = ["JUDGES", "TASKS", "ReviewsTask", "build_reviews_task", "gold_reward", "score_texts"]
