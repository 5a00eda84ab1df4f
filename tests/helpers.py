import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """True if two PyTrees have the same structure and all leaves are close."""
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        return False
    return all(
        np.shape(a) == np.shape(b) and np.allclose(a, b, rtol=rtol, atol=atol)
        for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def tree_max_abs_diff(x, y) -> float:
    return max(
        float(jnp.max(jnp.abs(a - b))) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))
    )


def sequential(f, s0, xs=None, length=None):
    """The reference trajectory, by `jax.lax.scan`."""

    def step(s, x):
        s = f(s, x)
        return s, s

    return lax.scan(step, s0, xs, length=length)[1]


def finite_difference_jvp(fn, primals, tangents, eps=1e-6):
    """Central-difference JVP of `fn` at `primals` along `tangents` (float64)."""
    plus = jtu.tree_map(lambda p, t: p + eps * t, primals, tangents)
    minus = jtu.tree_map(lambda p, t: p - eps * t, primals, tangents)
    return jtu.tree_map(lambda a, b: (a - b) / (2 * eps), fn(*plus), fn(*minus))


def random_contraction(key, size, contraction, dtype):
    """A random matrix with spectral norm `contraction`."""
    W = jax.random.normal(key, (size, size), dtype)
    return contraction * W / jnp.linalg.norm(W, ord=2)
