"""Honest timing: compile separately, warm up, block until ready, take the median."""

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def measure(
    fn: Callable, *args: Any, repeats: int = 5, long_warmup_s: float | None = None
) -> tuple[Any, float, float]:
    """Compile `jax.jit(fn)` for `args`, then time it.

    **Returns:** `(output, compile_seconds, median_run_seconds)`. The first call after
    compilation is a warm-up and is not timed; every timed call is followed by
    `jax.block_until_ready`. If `long_warmup_s` is given and the warm-up took longer,
    the warm-up is the measurement (long runs are not repeated).
    """
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    warmup_s = time.perf_counter() - start
    if long_warmup_s is not None and warmup_s > long_warmup_s:
        return out, compile_s, warmup_s
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return out, compile_s, statistics.median(times)


def environment() -> dict[str, str]:
    """jax version, backend and device, to stamp benchmark rows with."""
    device = jax.devices()[0]
    return dict(
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        device=getattr(device, "device_kind", str(device)),
    )
