"""A model file for `parassm diagnose --model`: a leaky random RNN driven by noise.

    parassm diagnose --model docs/examples/model_file.py:make --param gain=0.9 --T 5000

`make` is the factory. `--param NAME=VALUE` sets its keyword arguments (`gain`, `leak`,
`size`); it also declares `T`, `dtype` and `key`, so it receives `--T`, `--dtype` and
`--seed` (as a JAX PRNG key).
"""

import math

import jax.numpy as jnp
import jax.random as jr


def make(T=2000, *, dtype=jnp.float32, key=None, size=8, gain=0.9, leak=0.5):
    """`(f, s0, xs)` for $s_t = (1 - l) s_{t-1} + l \\tanh(W s_{t-1} + x_t)$, with a
    random $W$ of spectral scale `gain` and Gaussian inputs."""
    key = jr.key(0) if key is None else key
    wkey, xkey = jr.split(key)
    W = jr.normal(wkey, (size, size), dtype) * (gain / math.sqrt(size))

    def f(s, x):
        return (1 - leak) * s + leak * jnp.tanh(W @ s + x)

    s0 = jnp.zeros(size, dtype)
    xs = 0.5 * jr.normal(xkey, (T, size), dtype)
    return f, s0, xs
