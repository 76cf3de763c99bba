"""The numerical suite runs in float64 with rank promotion raising, as the conventions ask."""

import os

# The suite compiles a few thousand small programs and runs each once or twice at tiny sizes, so
# LLVM's optimisation of the generated code costs far more than it saves (about 40% of the suite's
# CPU time). Set before JAX starts its backend; subprocesses started by tests inherit it.
os.environ["XLA_FLAGS"] = " ".join(
    [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]
).strip()

import jax  # noqa: E402
import pytest  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# Run only in their own processes (test_sharding.py, test_multiprocess.py and test_benchmarks.py start
# them, the first two with several host devices); doctest collection would import them here.
collect_ignore = ["sharded_check.py", "multiprocess_worker.py", "benchmark_smoke.py"]

# One compilation cache for both test workers (and for the subprocesses of test_benchmarks.py): the
# same small programs recur across tests. Keyed by program, JAX version and XLA flags, so it never
# serves a stale or differently optimised program. Programs compiled in under 50 ms (most of the
# op-by-op ones outside jit) cost more to write and read back than to compile again.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.05)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

# Property tests are derandomised (no database, no deadline), so runs repeat.
settings.register_profile("jaxbptt", derandomize=True, database=None, deadline=None, max_examples=6,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("jaxbptt")


@pytest.fixture(autouse=True)
def _no_leaked_x64_state():
    yield
