from __future__ import annotations

import pytest
import trio.testing

from trio_raft.envelope import KEK


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


@pytest.fixture
def kek() -> KEK:
    return KEK(bytes(range(32)), "test")
