from __future__ import annotations

import pytest

from trio_raft.envelope import KEK


@pytest.fixture
def kek() -> KEK:
    return KEK(bytes(range(32)), "test")
