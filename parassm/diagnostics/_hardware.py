"""A model of the machine, measured on it: what a sequential step and a vectorised pass
cost, for the cost model behind [`parassm.Auto`][] and [`parassm.diagnose`][].

The measurement is a short micro-benchmark (four small compiled programs, well under a
second on a CPU), run on the host outside any trace, once per device kind, dtype and
jax version, and cached on disk: in `$PARASSM_CACHE_DIR` if set, else
`$XDG_CACHE_HOME/parassm` (default `~/.cache/parassm`). Each entry is one small JSON
file written to a temporary name and moved into place with `os.replace`, so concurrent
processes never read a partial file (the last writer wins; they measure the same
thing). An unreadable entry is measured again. Nothing is measured at import time.
"""

import dataclasses
import json
import math
import os
import pathlib
import tempfile
import threading
import time
from collections.abc import Callable

import equinox as eqx
import jax
import jax.extend.core as jex_core
import jax.lax as lax
import jax.numpy as jnp
import numpy as np


CACHE_ENV = "PARASSM_CACHE_DIR"
# Bumped whenever the micro-benchmark changes, so that old entries are not reused.
VERSION = 1
# Primitives that cost much more than one flop per output element.
_TRANSCENDENTAL = {
    "exp",
    "exp2",
    "expm1",
    "log",
    "log1p",
    "tanh",
    "logistic",
    "sin",
    "cos",
    "tan",
    "pow",
    "erf",
    "erf_inv",
    "atan2",
    "sqrt",
    "rsqrt",
    "cbrt",
    "div",
}
TRANSCENDENTAL_FLOPS = 8


def cache_dir() -> pathlib.Path:
    """Where measured hardware models are cached: `$PARASSM_CACHE_DIR`, else
    `$XDG_CACHE_HOME/parassm`, else `~/.cache/parassm`."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return pathlib.Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "parassm"


class Hardware(eqx.Module):
    """A model of the machine in seconds: the cost of a sequential step and of a
    vectorised pass, for the cost model of [`parassm.Auto`][] and
    [`parassm.diagnose`][].

    A sequential evaluation of `T` steps of a step function of `w` flops costs
    `T (step_latency + w / sequential_flops)`; one vectorised pass over `T` steps of
    work `W` per step (one level of an associative scan, or a batched evaluation of `f`)
    costs `call_latency + T W / vector_flops`.

    **Arguments:**

    - `step_latency`: the fixed cost of one step of a `jax.lax.scan`, in seconds.
    - `sequential_flops`: floating-point operations per second inside a scan step.
    - `call_latency`: the fixed cost of one vectorised pass inside a compiled program
        (one level of an associative scan), in seconds.
    - `vector_flops`: floating-point operations per second of a vectorised pass.
    - `name`: a label for reports.
    - `loop_scan`: whether the linear solve of a Newton step runs one step after the
        other on this machine ([`parassm.linear.LoopScan`][], the default on the CPU
        backend): the cost model then costs it as `T` sequential steps instead of the
        associative scan's `O(log T)` vectorised passes. `detect` sets it on CPU.

    [`parassm.diagnostics.Hardware.detect`][] measures these on the machine it runs on.
    """

    step_latency: float = eqx.field(static=True)
    sequential_flops: float = eqx.field(static=True)
    call_latency: float = eqx.field(static=True)
    vector_flops: float = eqx.field(static=True)
    name: str = eqx.field(default="custom", static=True)
    loop_scan: bool = eqx.field(default=False, static=True)

    def __check_init__(self):
        for field in ("step_latency", "sequential_flops", "call_latency", "vector_flops"):
            value = getattr(self, field)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"`Hardware.{field}` must be a positive number, got {value!r}.")

    def sequential_time(self, length: int, flops: float) -> float:
        """Seconds for `length` sequential steps of `flops` each."""
        return length * (self.step_latency + flops / self.sequential_flops)

    def pass_time(self, length: int, flops: float) -> float:
        """Seconds for one vectorised pass over `length` steps of `flops` each."""
        return self.call_latency + length * flops / self.vector_flops

    def width(self, flops: float) -> float:
        """How many steps of `flops` each one vectorised pass evaluates in the time of
        one sequential step (1 on a CPU with few cores, thousands on a GPU)."""
        return (self.step_latency + flops / self.sequential_flops) * self.vector_flops / flops

    @classmethod
    def detect(cls, dtype=None) -> "Hardware":
        """The model of the default device, measured on first use for this device
        kind, `dtype` (default: JAX's default float) and jax version, then read from
        the cache (see `docs/diagnostics.md`). Safe to call under a trace: the
        measurement runs on the host, on its own concrete inputs."""
        dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
        device = jax.devices()[0]
        kind = getattr(device, "device_kind", device.platform)
        key = f"{device.platform}-{kind}-{dtype.name}-jax{jax.__version__}-v{VERSION}"
        key = "".join(c if c.isalnum() or c in "-._" else "_" for c in key)
        with _LOCK:
            if key not in _MEMORY:
                hw = _load_or_measure(key, dtype, f"{device.platform} ({kind})")
                # The platform's default linear scan (see `linear.default_scan_impl`).
                _MEMORY[key] = dataclasses.replace(hw, loop_scan=device.platform == "cpu")
            return _MEMORY[key]


_LOCK = threading.Lock()
_MEMORY: dict[str, Hardware] = {}


def _fields(hw: Hardware) -> dict:
    return dict(
        step_latency=hw.step_latency,
        sequential_flops=hw.sequential_flops,
        call_latency=hw.call_latency,
        vector_flops=hw.vector_flops,
        name=hw.name,
    )


def read_entry(path: pathlib.Path) -> Hardware | None:
    """The model stored at `path`, or None if it is missing or unreadable."""
    try:
        with open(path) as file:
            return Hardware(**json.load(file)["hardware"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_entry(path: pathlib.Path, hardware: Hardware, **extra) -> None:
    """Write atomically: a temporary file in the same folder, then `os.replace`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = dict(hardware=_fields(hardware), **extra)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            json.dump(payload, file, indent=1)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _load_or_measure(key: str, dtype, name: str) -> Hardware:
    path = cache_dir() / f"hardware-{key}.json"
    hardware = read_entry(path)
    if hardware is not None:
        return hardware
    start = time.perf_counter()
    hardware = measure(dtype, name)
    seconds = time.perf_counter() - start
    try:
        write_entry(path, hardware, measured_in_s=seconds, date=time.strftime("%Y-%m-%d"))
    except OSError:
        pass  # a read-only cache: measure again next process
    return hardware


def _best_time(fn: Callable, *args, repeats: int = 7) -> float:
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        best = min(best, time.perf_counter() - start)
    return best


def measure(dtype=None, name: str | None = None) -> Hardware:
    """Run the micro-benchmark now (no cache): the per-step latency and throughput of
    a `lax.scan` of a small dense step (two sizes), the throughput of that step
    vectorised over many time steps, and the per-level cost of an associative scan."""
    dtype = jnp.dtype(jnp.result_type(float) if dtype is None else dtype)
    name = name or jax.default_backend()
    rng = np.random.default_rng(0)
    with jax.ensure_compile_time_eval():

        def step(s, w):
            return jnp.tanh(w @ s), None

        def scan_time(d, n):
            w = jnp.asarray(rng.normal(size=(d, d)) / math.sqrt(d), dtype)
            s0 = jnp.zeros(d, dtype).at[0].set(1)

            def run(w, s0):
                return lax.scan(lambda s, _: step(s, w), s0, None, length=n)[0]

            return _best_time(run, w, s0) / n, step_flops(lambda s: step(s, w)[0], s0)

        small, small_flops = scan_time(4, 4096)
        big, big_flops = scan_time(128, 256)
        sequential_flops = max((big_flops - small_flops) / max(big - small, 1e-12), 1e6)
        step_latency = max(small - small_flops / sequential_flops, 1e-9)

        d, n = 32, 16384
        w = jnp.asarray(rng.normal(size=(d, d)) / math.sqrt(d), dtype)
        states = jnp.asarray(rng.normal(size=(n, d)), dtype)
        vec = _best_time(lambda w, s: jnp.tanh(s @ w.T), w, states)

        levels_n = 256
        a = jnp.asarray(rng.uniform(0.5, 1.0, size=levels_n), dtype)

        def affine(x, y):
            return y[0] * x[0], y[0] * x[1] + y[1]

        level = _best_time(lambda a: lax.associative_scan(affine, (a, a))[1], a)
        call_latency = max(level / (2 * math.ceil(math.log2(levels_n))), 1e-9)
        flops = n * step_flops(lambda s: step(s, w)[0], states[0])
        vector_flops = max(flops / max(vec - call_latency, 1e-9), 1e6)
    return Hardware(
        step_latency=float(step_latency),
        sequential_flops=float(sequential_flops),
        call_latency=float(call_latency),
        vector_flops=float(vector_flops),
        name=f"{name}, {dtype.name}, measured",
    )


def step_flops(fn: Callable, *args) -> float:
    """Floating-point operations of one call of `fn`, counted on its jaxpr (matrix
    products exactly, transcendental functions as `TRANSCENDENTAL_FLOPS`, anything else
    as one per output element). Traces `fn` once; works under an outer trace."""
    specs = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), args
    )
    jaxpr = jax.make_jaxpr(fn)(*specs)
    return float(max(_jaxpr_flops(jaxpr.jaxpr), 1))


def _jaxpr_flops(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        subs = list(jex_core.jaxprs_in_params(eqn.params))
        if subs:
            inner = max(_jaxpr_flops(getattr(s, "jaxpr", s)) for s in subs)
            total += inner * eqn.params.get("length", 1)
            continue
        out = sum(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
        name = eqn.primitive.name
        if name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * out * math.prod(lhs_shape[i] for i in contract)
        elif name in _TRANSCENDENTAL:
            total += TRANSCENDENTAL_FLOPS * out
        else:
            total += out
    return total
