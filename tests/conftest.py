"""Fixtures shared by every test package.

``clock``: trio's mock clock with ``autojump_threshold=0``. A test that asks for it runs on
virtual time (pytest-trio uses a requested fixture that is a trio clock as the run's clock):
sleeps and timeouts jump as soon as every task is blocked, so timed logic runs in
milliseconds without depending on the machine's load.
"""

from __future__ import annotations

import pytest
import trio.testing


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)
