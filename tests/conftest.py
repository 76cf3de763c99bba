"""The numerical suite runs in float64 with rank promotion raising, as the conventions ask."""

import jax
import pytest

# Runs only in its own process with 8 host devices (test_sharding.py starts it); doctest collection
# would import it here, where that flag is not set.
collect_ignore = ["sharded_check.py"]

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_leaked_x64_state():
    yield
