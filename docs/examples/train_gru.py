"""Train a small GRU model on a synthetic sequence task twice: with the cell evaluated
in parallel by parassm, and with `jax.lax.scan`. The loss curves coincide.

The model is per sample and the batch is `jax.vmap` over it, as with `equinox.nn`: the
batch runs as one vectorised program, and each sequence keeps its own Newton steps.
The solver is fixed once, in the layer (`solver=parassm.QuasiDEER()`), for the jitted
training step: `parassm.Auto()` decides from concrete values (it diagnoses the
problem on the host), which a traced step does not have. To let Auto choose, call
`parassm.Auto().decide(f, s0, T, xs=...)` once on a concrete batch element outside
the step, and build the layer with the solver it returns.

Run: `python docs/examples/train_gru.py [--steps 60] [--T 200]`.
"""

import argparse

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import parassm


class Model(eqx.Module):
    """A GRU over the sequence, then a linear read-out at every step."""

    rnn: parassm.nn.ParallelRNN
    readout: eqx.nn.Linear
    sequential: bool = eqx.field(static=True)

    def __init__(self, hidden, *, sequential, key):
        k1, k2 = jr.split(key)
        cell = eqx.nn.GRUCell(1, hidden, key=k1)
        self.rnn = parassm.nn.ParallelRNN(cell, solver=parassm.QuasiDEER())
        self.readout = eqx.nn.Linear(hidden, 1, key=k2)
        self.sequential = sequential

    def __call__(self, xs):
        if self.sequential:
            cell = self.rnn.cell
            h0 = jnp.zeros(cell.hidden_size)
            hs = lax.scan(lambda h, x: (cell(x, h),) * 2, h0, xs)[1]
        else:
            hs = self.rnn(xs)
        return jax.vmap(self.readout)(hs)


def make_data(key, batch, T):
    """Target: an exponentially smoothed running mean of a noisy input."""
    xs = jr.normal(key, (batch, T, 1))

    def smooth(x):
        return lax.scan(lambda m, u: (0.9 * m + 0.1 * u,) * 2, jnp.zeros(1), x)[1]

    return xs, jax.vmap(smooth)(xs)


def train(sequential, steps, T, seed=0):
    model = Model(16, sequential=sequential, key=jr.key(seed))
    xs, ys = make_data(jr.key(1), 8, T)

    @eqx.filter_jit
    def step(model):
        def loss(model):
            pred = jax.vmap(model)(xs)
            return jnp.mean((pred - ys) ** 2)

        value, grads = eqx.filter_value_and_grad(loss)(model)
        model = eqx.apply_updates(model, jax.tree_util.tree_map(lambda g: -0.5 * g, grads))
        return model, value

    losses = []
    for _ in range(steps):
        model, value = step(model)
        losses.append(float(value))
    return losses


def main(steps=60, T=200):
    parallel = train(sequential=False, steps=steps, T=T)
    reference = train(sequential=True, steps=steps, T=T)
    print(f"{'step':>5} {'parassm':>12} {'lax.scan':>12}")
    for i in range(0, steps, max(1, steps // 10)):
        print(f"{i:>5} {parallel[i]:>12.6f} {reference[i]:>12.6f}")
    gap = max(abs(a - b) / abs(b) for a, b in zip(parallel, reference))
    print(f"largest relative difference between the loss curves: {gap:.2e}")
    return parallel, reference


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--T", type=int, default=200)
    args = parser.parse_args()
    main(args.steps, args.T)
