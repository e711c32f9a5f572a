"""The DPO tests' session fixtures (`shared_dir`, `reviews`, `sft_run`) live in tests/conftest.py,
shared with the sweep and runtime tests; helpers in dpo_helpers.py."""
