import os
import tempfile


# Most of this suite's time is XLA compiling small programs, and LLVM's optimisation
# passes (level 3 by default) take two thirds of it. The tests check results, not
# speed, so compile without them unless the caller set XLA_FLAGS; and with the CPU
# backend's older fusion emitters, which compile in about half the time of the MLIR
# ones (DEER on a small GRU: 0.74 -> 0.45 s, ELK 2.9 -> 1.5 s). Read when the backend
# starts, so before any test touches jax.
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)
# The hardware model Auto measures (with those flags) goes to a throwaway cache, not the
# user's.
os.environ.setdefault("PARASSM_CACHE_DIR", tempfile.mkdtemp(prefix="parassm-test-cache-"))

import jax
import jax.random as jr
import parassm
import pytest
from hypothesis import settings


# Fake CPU devices for the sequence-parallel tests (only ever set here, never in parassm).
jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

settings.register_profile("ci", max_examples=8, deadline=None, derandomize=True)
settings.register_profile("dev", max_examples=30, deadline=None)
settings.load_profile("ci")


@pytest.fixture
def getkey():
    counter = iter(range(1_000_000))

    def _getkey():
        return jr.key(next(counter))

    return _getkey


@pytest.fixture(autouse=True)
def _associative_scan(request):
    """Run the solvers with the associative scan, the parallel algorithm accelerators run.
    The library's default on CPU is `parassm.linear.LoopScan` (faster there); tests of it
    and of the CPU default are marked `default_scan` and run without this context."""
    if request.node.get_closest_marker("default_scan"):
        yield
    else:
        with parassm.linear.scan_impl("xla"):
            yield
