"""Every patch test starts and ends with Tunix and qwix unpatched."""

import pytest

import gemma4_jax.patches as patches


@pytest.fixture(autouse=True)
def _unpatched_between_tests():
  patches.revert()
  yield
  patches.revert()
