from __future__ import annotations

import pytest
import trio.testing

from tests.engine.kv import KV


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def make_kv():
    return KV
