"""tests/train: importing the helpers switches on the shared compilation cache."""

import runtime_helpers  # noqa: F401
