"""Compiled programs that live as long as the problem they were compiled for.

`eqx.filter_jit` of a module-level function holds every static argument (the user's
step function `f`, say) in jax's compilation cache, and with it the compiled program,
until jax's cache of 8192 entries evicts it. A CPU executable keeps memory mappings of
its own (about 320 for one DEER program), so a process solving a few hundred distinct
problems runs into the kernel's per-process limit (`vm.max_map_count`, 65530 on most
Linux systems) and XLA crashes while compiling.

[`filter_jit`][] compiles instead one `jax.jit` per distinct signature (the static
arguments, the shapes and dtypes of the arrays) and holds it in a table of its own:

- Static arguments compared by identity (functions, `functools.partial`, bound methods,
  any weak-referenceable object without value equality) are held only by weak
  reference: when the caller drops the last reference to `f`, its programs go with it.
- The table is an LRU whose size is set by [`parassm.set_program_cache_size`][] (or
  the environment variable `PARASSM_PROGRAM_CACHE_SIZE` before import; default 32): it
  bounds the programs of static arguments held by value, or of a caller that keeps
  every `f` alive.

[`WeakLRU`][] is the same table for host-side caches keyed on a problem (Auto's
diagnoses).
"""

import collections
import functools as ft
import logging
import os
import re
import threading
import types
import weakref
from collections.abc import Callable, Hashable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu


_DEFAULT_SIZE = 32
_ENV = "PARASSM_PROGRAM_CACHE_SIZE"


def _size_from_env() -> int:
    value = os.environ.get(_ENV)
    if value is None:
        return _DEFAULT_SIZE
    try:
        size = int(value)
    except ValueError:
        raise ValueError(
            f"The environment variable {_ENV}={value!r} must be a non-negative integer "
            "(the number of compiled parassm programs to keep)."
        ) from None
    if size < 0:
        raise ValueError(f"{_ENV} must be a non-negative integer, got {size}.")
    return size


class _Owner:
    """A weak reference to a static argument compared by identity."""

    __slots__ = ("ref",)

    def __init__(self, ref):
        self.ref = ref

    def __call__(self):
        value = self.ref()
        if value is None:
            raise RuntimeError(
                "A static argument of a parassm program was garbage-collected while the "
                "program was being traced; keep a reference to it for the duration of "
                "the call."
            )
        return value


def _is_weak_identity(leaf) -> bool:
    return type(leaf).__eq__ is object.__eq__


def split_static(leaves) -> tuple[tuple, list, list]:
    """`(key, template, owners)` of the static leaves of a call: the key compares
    identity-compared leaves by `id` (holding them only weakly, through `template`);
    `owners` are the objects whose death must drop what is keyed on them."""
    key: list[Hashable] = []
    template: list[Any] = []
    owners: list[Any] = []
    for leaf in leaves:
        if isinstance(leaf, types.MethodType):
            try:
                ref = weakref.WeakMethod(leaf)
            except TypeError:
                pass
            else:
                key.append(("method", id(leaf.__self__), id(leaf.__func__)))
                template.append(_Owner(ref))
                owners += [leaf.__self__, leaf.__func__]
                continue
        elif _is_weak_identity(leaf):
            try:
                ref = weakref.ref(leaf)
            except TypeError:
                pass
            else:
                key.append(("id", id(leaf)))
                template.append(_Owner(ref))
                owners.append(leaf)
                continue
        try:
            hash(leaf)
        except TypeError:
            raise TypeError(
                f"A static argument of type {type(leaf).__name__} is neither an array nor "
                "hashable, so parassm cannot compile a program for it. Pass arrays (or "
                "PyTrees of arrays) for values, and hashable objects for settings."
            ) from None
        key.append(("value", leaf))
        template.append(leaf)
    return tuple(key), template, owners


class WeakLRU:
    """A least-recently-used table of at most `size` entries, each also dropped when
    any of its owners (objects compared by identity, held weakly) is garbage-collected."""

    def __init__(self, size: int):
        self._size = size
        self._lock = threading.RLock()
        self._table: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._table)

    def get(self, key):
        with self._lock:
            entry = self._table.get(key)
            if entry is None:
                return None
            self._table.move_to_end(key)
            return entry[0]

    def put(self, key, value, owners) -> None:
        with self._lock:
            self._pop(key)
            token = object()
            finalizers = []
            for owner in owners:
                finalizer = weakref.finalize(owner, self._drop, key, token)
                finalizer.atexit = False
                finalizers.append(finalizer)
            self._table[key] = (value, finalizers, token)
            self._trim()

    def resize(self, size: int) -> None:
        with self._lock:
            self._size = size
            self._trim()

    def clear(self) -> None:
        with self._lock:
            for key in list(self._table):
                self._pop(key)

    def _trim(self) -> None:
        while len(self._table) > self._size:
            self._pop(next(iter(self._table)))

    def _pop(self, key) -> None:
        entry = self._table.pop(key, None)
        if entry is not None:
            for finalizer in entry[1]:
                finalizer.detach()

    def _drop(self, key, token) -> None:
        with self._lock:
            entry = self._table.get(key)
            # An entry put again under the same key since has its own finalizers.
            if entry is not None and entry[2] is token:
                self._pop(key)


_PROGRAMS = WeakLRU(_size_from_env())


def set_program_cache_size(size: int) -> None:
    """Set how many compiled programs parassm keeps (an LRU; default 32, or the
    environment variable `PARASSM_PROGRAM_CACHE_SIZE` read at import).

    Programs are also released as soon as the step function (or any other static
    argument compared by identity) they were compiled for is garbage-collected, so the
    size only bounds programs whose functions stay alive. Each compiled program holds
    memory, and on CPU memory mappings (about 320 for one DEER program; Linux allows
    65530 per process by default): lower the size for a process that keeps thousands of
    step functions alive, raise it to avoid recompiling when more than 32 live
    problems alternate. `0` keeps none (every call compiles).

    **Arguments:**

    - `size`: a non-negative integer.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"`size` must be a non-negative int, got {size!r}.")
    _PROGRAMS.resize(size)


def clear_programs() -> None:
    """Release every compiled program parassm holds (jax's own caches are left alone;
    see `jax.clear_caches`)."""
    _PROGRAMS.clear()


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


_EQX_ERROR = re.compile(r"_EquinoxRuntimeError: (.*?)(?:\n\n-{5,}|\Z)", re.DOTALL)


class _QuietCallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != "jax.pure_callback failed"


def _compile(fn: Callable, treedef, template: list) -> Callable:
    # A fresh function per program, closing over weak references only: once the table
    # drops the program, nothing keeps the `jax.jit` (so its executables) alive.
    def program(dynamic):
        leaves = [leaf() if isinstance(leaf, _Owner) else leaf for leaf in template]
        args, kwargs = eqx.combine(dynamic, jtu.tree_unflatten(treedef, leaves))
        out = fn(*args, **kwargs)
        dynamic_out, static_out = eqx.partition(out, eqx.is_array)
        return dynamic_out, _Static(static_out)

    program.__name__ = program.__qualname__ = getattr(fn, "__name__", "program")
    return jax.jit(program)


def filter_jit(fn: Callable) -> Callable:
    """Like `eqx.filter_jit` (arrays traced, everything else static; runtime errors of
    `eqx.error_if` raised as `eqx.EquinoxRuntimeError`), with the compiled programs kept
    in parassm's table (see the module docstring) instead of jax's global cache."""

    @ft.wraps(fn)
    def call(*args, **kwargs):
        __tracebackhide__ = True
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        leaves, treedef = jtu.tree_flatten(static)
        key, template, owners = split_static(leaves)
        # The types of the arrays too: one entry is one executable, so the table's size
        # bounds the executables held.
        arrays, array_def = jtu.tree_flatten(dynamic)
        key = (fn, treedef, key, array_def, tuple(jax.typeof(x) for x in arrays))
        program = _PROGRAMS.get(key)
        if program is None:
            program = _compile(fn, treedef, template)
            _PROGRAMS.put(key, program, owners)
        callback_logger = logging.getLogger("jax._src.callback")
        quiet = _QuietCallback()
        callback_logger.addFilter(quiet)
        try:
            dynamic_out, static_out = program(dynamic)
            if not any(isinstance(x, jax.core.Tracer) for x in jtu.tree_leaves(dynamic_out)):
                # Runtime errors (`eqx.error_if`) surface here, not at a later use.
                jax.block_until_ready(dynamic_out)
        except jax.errors.JaxRuntimeError as e:
            match = _EQX_ERROR.search(str(e))
            if match is None:
                raise
            raise eqx.EquinoxRuntimeError(match.group(1).strip()) from None
        finally:
            callback_logger.removeFilter(quiet)
        return eqx.combine(dynamic_out, static_out.value)

    return call
