"""Jepsen-style fault suite: multi-process kvnode clusters under faults, histories checked for
linearizability (``python -m tests.chaos --minutes N --seed S``; CI: ``pytest tests/chaos``)."""

import os
import sys

_EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "examples")
if _EXAMPLES not in sys.path:
    sys.path.insert(0, _EXAMPLES)
