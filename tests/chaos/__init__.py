"""Jepsen-style fault suite: multi-process kvnode clusters under faults, histories checked for
linearizability (``python -m tests.chaos --minutes N --seed S``; CI: ``pytest tests/chaos``)."""
