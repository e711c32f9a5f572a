"""rlhf_jax.data: host-side data pipeline (sources -> tokenised rows -> static-shape batches)
and the built-in offline tasks.

Modules: sources.py (load files/dirs/hub into train/eval), tokenizer.py (tokenizer.json
wrapper), chat.py (chat templates), examples.py (validation, truncation, TokenizedDataset),
text.py (SFT formats), preference.py (pair formats), prompts.py (prompt-only), batching.py
(buckets, collation, BatchIterator), pipeline.py (gin-configurable make_*_iterator),
labelling.py (Bradley-Terry labels of sampled pairs, the preference folder they are written
to), tasks/ (the "reviews" task and its gold judges, `TASKS` by name).

Importing this package registers the gin configurables `sft_data`, `preference_data`,
`prompt_data`, `reviews_task` and `gold_reward`.
"""

from rlhf_jax.data.batching import (
    BatchIterator,
    collate_preference,
    collate_prompts,
    collate_sft,
    device_fields,
    pick_bucket,
)
from rlhf_jax.data.errors import DataError, TokenizerError
from rlhf_jax.data.examples import TokenizedDataset
from rlhf_jax.data.pipeline import (
    make_preference_iterator,
    make_prompt_iterator,
    make_sft_iterator,
)
from rlhf_jax.data.preference import build_preference_dataset, split_transcripts
from rlhf_jax.data.prompts import build_prompt_dataset
from rlhf_jax.data.sources import load_source
from rlhf_jax.data.tasks import judges, reviews
from rlhf_jax.data.text import build_sft_dataset
from rlhf_jax.data.tokenizer import Tokenizer

__all__ = [
    "BatchIterator",
    "DataError",
    "TokenizedDataset",
    "Tokenizer",
    "TokenizerError",
    "build_preference_dataset",
    "build_prompt_dataset",
    "build_sft_dataset",
    "collate_preference",
    "collate_prompts",
    "collate_sft",
    "device_fields",
    "judges",
    "load_source",
    "make_preference_iterator",
    "make_prompt_iterator",
    "make_sft_iterator",
    "pick_bucket",
    "reviews",
    "split_transcripts",
]
