"""The numerical suite runs in float64 with rank promotion raising, as the conventions ask."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_leaked_x64_state():
    yield
