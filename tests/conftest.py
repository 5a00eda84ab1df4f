import jax
import jax.random as jr
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
