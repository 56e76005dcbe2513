from __future__ import annotations

import pytest

from tests.engine.kv import KV


@pytest.fixture
def make_kv():
    return KV
