"""The numerical suite runs in float64 with rank promotion raising, as the conventions ask."""

import jax
import pytest

# Run only in their own processes with several host devices (test_sharding.py and
# test_multiprocess.py start them); doctest collection would import them here, without that flag.
collect_ignore = ["sharded_check.py", "multiprocess_worker.py"]

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(autouse=True)
def _no_leaked_x64_state():
    yield
