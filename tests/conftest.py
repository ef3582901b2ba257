"""Shared setup of the test suite.

- ``tests/`` is put on ``sys.path`` so that test modules can ``import helpers`` whatever the
  pytest import mode.
- Every test starts from the same global RNG state, so results never depend on test order.
- Every test runs with torch's default matmul precision and leaves it as it found it.
- ``fresh_dynamo``: compile tests start and end with an empty dynamo cache (use it with
  ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


@pytest.fixture(autouse=True)
def _seeded():
    """Seed the global RNG before each test; restore the matmul precision after it."""
    precision = torch.get_float32_matmul_precision()
    torch.manual_seed(0)
    yield
    torch.set_float32_matmul_precision(precision)


@pytest.fixture
def fresh_dynamo():
    """Reset torch.compile's caches before and after a test, so that graph counts are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
