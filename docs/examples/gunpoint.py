"""Train a GRU classifier on the UCR GunPoint time series twice: with the cell evaluated
in parallel over time by `parassm.nn.ParallelRNN`, and with `jax.lax.scan` (same seed,
same batches, same epochs). Then diagnose the cell with `parassm.diagnose`, before and
after training: is the trained model predictable?

Needs the `examples` extra (`pip install -e '.[examples]'`: aeon, which ships GunPoint,
and optax) and matplotlib for the plot.

Run: `python docs/examples/gunpoint.py [--epochs 60] [--json PATH] [--plot PATH]`.
"""

import argparse
import json
import os
import platform
import statistics
import time

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import parassm


HIDDEN = 32
# DEER with the GRU's closed-form Jacobian (ParallelRNN supplies it). A jitted training
# step needs a fixed solver: `Auto` decides on concrete values only.
SOLVER = parassm.DEER()
DTYPE = jnp.float32


def load_gunpoint():
    """GunPoint as `(x_train, y_train, x_test, y_test)`: inputs of shape `(N, 150, 1)`
    (time first, one channel; the series are z-normalised already) and labels 0 or 1."""
    from aeon.datasets import load_gunpoint as load

    out = []
    for split in ("train", "test"):
        X, y = load(split=split)
        out.append(np.transpose(X, (0, 2, 1)).astype(np.float32))
        out.append((y.astype(int) - 1).astype(np.int32))
    return tuple(out)


class Classifier(eqx.Module):
    """A GRU over the series, then a linear read-out of the last hidden state."""

    rnn: parassm.nn.ParallelRNN
    head: eqx.nn.Linear
    sequential: bool = eqx.field(static=True)

    def __init__(self, hidden, *, sequential, key):
        k1, k2 = jr.split(key)
        cell = eqx.nn.GRUCell(1, hidden, key=k1, dtype=DTYPE)
        self.rnn = parassm.nn.ParallelRNN(cell, solver=SOLVER)
        self.head = eqx.nn.Linear(hidden, 2, key=k2, dtype=DTYPE)
        self.sequential = sequential

    def __call__(self, xs):
        """Logits of one series and the Newton steps it took (0 for `lax.scan`)."""
        if self.sequential:
            cell = self.rnn.cell
            h0 = jnp.zeros(cell.hidden_size, DTYPE)
            hs = lax.scan(lambda h, x: (cell(x, h),) * 2, h0, xs)[1]
            steps = jnp.zeros((), jnp.int32)
        else:
            sol = self.rnn.solve(xs)
            hs, steps = sol.value, sol.stats["num_steps"]
        return self.head(hs[-1]), steps


def optimizer(lr, total_steps):
    """Adam with a cosine decay and clipped gradients. Without the clipping and decay
    (plain `optax.adam(1e-2)`) training is chaotic here: `lax.scan` alone, from weights
    perturbed by one part in 1e6, ended anywhere between 52% and 97% test accuracy, so
    two paths that differ by rounding could not be compared."""
    schedule = optax.cosine_decay_schedule(lr, total_steps)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def make_functions(optim):
    @eqx.filter_jit
    def train_step(model, opt_state, xs, ys):
        def loss_fn(model):
            logits, steps = jax.vmap(model)(xs)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()
            return loss, steps

        (loss, steps), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(model)
        updates, opt_state = optim.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), opt_state, loss, steps

    @eqx.filter_jit
    def accuracy(model, xs, ys):
        logits, _ = jax.vmap(model)(xs)
        return jnp.mean(jnp.argmax(logits, axis=-1) == ys)

    return train_step, accuracy


def batches(key, n, batch_size):
    """The same shuffled mini-batches for both paths (a key per epoch)."""
    perm = np.asarray(jr.permutation(key, n))
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]


def train(sequential, data, *, epochs, batch_size, lr, seed, hidden=HIDDEN, log=print):
    """Train one classifier; returns the model and what was measured."""
    x_train, y_train, x_test, y_test = data
    model = Classifier(hidden, sequential=sequential, key=jr.key(seed))
    optim = optimizer(lr, epochs * (len(x_train) // batch_size))
    opt_state = optim.init(eqx.filter(model, eqx.is_array))
    train_step, accuracy = make_functions(optim)
    order = [batches(k, len(x_train), batch_size) for k in jr.split(jr.key(seed + 1), epochs)]

    # Compile apart: one call on the first batch, its result discarded.
    idx = order[0][0]
    start = time.perf_counter()
    jax.block_until_ready(train_step(model, opt_state, x_train[idx], y_train[idx]))
    compile_s = time.perf_counter() - start

    losses, steps, epoch_s = [], [], []
    for epoch, epoch_batches in enumerate(order):
        start = time.perf_counter()
        outs = []
        for idx in epoch_batches:
            model, opt_state, loss, k = train_step(model, opt_state, x_train[idx], y_train[idx])
            outs.append((loss, k))
        jax.block_until_ready(outs)
        epoch_s.append(time.perf_counter() - start)
        losses += [float(loss) for loss, _ in outs]
        steps += [np.asarray(k).tolist() for _, k in outs]
        if epoch % max(1, epochs // 10) == 0 or epoch == epochs - 1:
            log(f"  epoch {epoch:>3}  loss {np.mean(losses[-len(outs) :]):.4f}")
    return dict(
        model=model,
        losses=losses,
        newton_steps=steps,
        compile_s=compile_s,
        epoch_s=epoch_s,
        test_accuracy=float(accuracy(model, x_test, y_test)),
        train_accuracy=float(accuracy(model, x_train, y_train)),
    )


class Step(eqx.Module):
    """The cell as parassm's state-first step `f(h, x)`. A Module (not a lambda), so
    `parassm.diagnose` compiles once for every series and both cells."""

    cell: eqx.nn.GRUCell

    def __call__(self, h, x):
        return self.cell(x, h)


@eqx.filter_jit
def measured_steps(step, xs, solver):
    """Newton steps of `parassm.evaluate` with `solver` on each series (from zeros)."""
    h0 = jnp.zeros(step.cell.hidden_size, DTYPE)

    def one(x):
        return parassm.evaluate(step, h0, xs=x, solver=solver).stats["num_steps"]

    return jax.vmap(one)(xs)


def diagnose_cell(cell, xs, every=5):
    """`parassm.diagnose` on every `every`-th series of `xs` (about a second each on a
    small CPU), and the Newton steps DEER and quasi-DEER take on all of them."""
    step = Step(cell)
    h0 = jnp.zeros(cell.hidden_size, DTYPE)
    solvers = {"DEER": parassm.DEER(), "QuasiDEER": parassm.QuasiDEER()}
    rows = [parassm.diagnose(step, h0, xs=x, solvers=tuple(solvers)) for x in xs[::every]]
    lles = np.array([d.lle for d in rows])
    regimes = [d.regime for d in rows]
    recommended = [d.recommended_name for d in rows]
    return dict(
        series_diagnosed=len(rows),
        series_measured=len(xs),
        lle=dict(
            mean=float(lles.mean()),
            min=float(lles.min()),
            max=float(lles.max()),
            median=float(np.median(lles)),
        ),
        regime={r: regimes.count(r) for r in sorted(set(regimes))},
        recommended={r: recommended.count(r) for r in sorted(set(recommended))},
        proxy_length=_summary([d.proxy_length for d in rows]),
        predicted_steps={
            name: _summary([d.predicted_steps[name] for d in rows]) for name in solvers
        },
        measured_steps={
            name: _summary(measured_steps(step, xs, solver).tolist())
            for name, solver in solvers.items()
        },
    )


def _summary(values):
    return dict(mean=float(np.mean(values)), min=int(min(values)), max=int(max(values)))


def plot(parallel, sequential, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(sequential["losses"], label="lax.scan", lw=2.5, alpha=0.6)
    ax.plot(parallel["losses"], label="ParallelRNN (DEER)", lw=1, ls="--")
    ax.set_xlabel("training step (mini-batch)")
    ax.set_ylabel("cross-entropy loss")
    ax.set_yscale("log")
    ax.set_title("GRU on GunPoint: both paths, same seed")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    epochs=60,
    batch_size=10,
    lr=1e-2,
    seed=0,
    json_path="bench/results/gunpoint_cpu.json",
    plot_path="docs/img/gunpoint_loss.png",
    associative_epochs=3,
):
    data = load_gunpoint()
    x_test = data[2]
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    init = Classifier(HIDDEN, sequential=False, key=jr.key(seed))
    print("diagnosing the cell at init ...")
    before = diagnose_cell(init.rnn.cell, x_test)
    runs = {}
    for name, sequential in (("parallel", False), ("lax_scan", True)):
        print(f"training with {'lax.scan' if sequential else 'ParallelRNN(DEER)'} ...")
        runs[name] = train(sequential, data, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    parallel, sequential = runs["parallel"], runs["lax_scan"]
    print("diagnosing the trained cell ...")
    after = diagnose_cell(parallel["model"].rnn.cell, x_test)
    associative = None
    if associative_epochs:
        # The library's linear scan is a loop on CPU (`parassm.linear.LoopScan`); time a
        # few epochs with the associative scan accelerators run, for comparison.
        print("timing the parallel path with the associative scan ...")
        with parassm.linear.scan_impl("xla"):
            run = train(
                False,
                data,
                epochs=associative_epochs,
                batch_size=batch_size,
                lr=lr,
                seed=seed,
                log=lambda *_: None,
            )
        associative = dict(
            epochs=associative_epochs,
            compile_s=run["compile_s"],
            epoch_s=run["epoch_s"],
            median_epoch_s=statistics.median(run["epoch_s"]),
            # The same first epochs with the default scan: the Newton steps change as
            # the model trains, so only the same epochs compare.
            default_scan_median_epoch_s=statistics.median(parallel["epoch_s"][:associative_epochs]),
        )

    # Warm epochs only: the first epoch after compilation can still pay one-off costs.
    per_epoch = {k: statistics.median(r["epoch_s"][1:] or r["epoch_s"]) for k, r in runs.items()}
    steps = np.asarray(parallel["newton_steps"])  # (batches, batch_size)
    gap = max(abs(a - b) for a, b in zip(parallel["losses"], sequential["losses"]))
    report = dict(
        problem="UCR GunPoint, GRU classifier (last hidden state -> linear)",
        T=int(x_test.shape[1]),
        hidden=HIDDEN,
        dtype=str(jnp.dtype(DTYPE)),
        solver=repr(SOLVER),
        linear_scan=type(parassm.linear.default_scan_impl()).__name__,
        epochs=epochs,
        batch_size=batch_size,
        optimizer=f"clip_by_global_norm(1.0), adam(cosine_decay_schedule({lr}))",
        seed=seed,
        test_accuracy={k: r["test_accuracy"] for k, r in runs.items()},
        train_accuracy={k: r["train_accuracy"] for k, r in runs.items()},
        compile_s={k: r["compile_s"] for k, r in runs.items()},
        median_epoch_s=per_epoch,
        epoch_time_ratio=per_epoch["parallel"] / per_epoch["lax_scan"],
        associative_scan=associative,
        newton_steps=dict(
            source="ParallelRNN.solve(xs).stats['num_steps'] per series, under jax.vmap",
            mean=float(steps.mean()),
            min=int(steps.min()),
            max=int(steps.max()),
            per_batch_max=steps.max(axis=1).tolist(),
        ),
        max_loss_difference=gap,
        diagnose=dict(init=before, trained=after),
        losses={k: r["losses"] for k, r in runs.items()},
        epoch_s={k: r["epoch_s"] for k, r in runs.items()},
        jax_version=jax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        cpu_count=os.cpu_count(),
        load_average_at_start=load,
        machine=platform.machine(),
    )
    print_report(report)
    if json_path:
        os.makedirs(os.path.dirname(json_path) or ".", exist_ok=True)
        with open(json_path, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {json_path}")
    if plot_path:
        plot(parallel, sequential, plot_path)
        print(f"wrote {plot_path}")
    return report


def print_report(r):
    print()
    print(f"{'':<26}{'ParallelRNN':>14}{'lax.scan':>14}")
    for label, key, fmt in (
        ("test accuracy", "test_accuracy", "{:>14.3f}"),
        ("train accuracy", "train_accuracy", "{:>14.3f}"),
        ("compile (s)", "compile_s", "{:>14.2f}"),
        ("seconds per epoch", "median_epoch_s", "{:>14.3f}"),
    ):
        row = "".join(fmt.format(r[key][k]) for k in ("parallel", "lax_scan"))
        print(f"{label:<26}{row}")
    print(f"epoch time ratio (parallel / lax.scan): {r['epoch_time_ratio']:.2f}")
    steps = r["newton_steps"]
    print(f"Newton steps per series: mean {steps['mean']:.2f}, max {steps['max']}")
    print(f"largest difference between the loss curves: {r['max_loss_difference']:.2e}")
    if r["associative_scan"]:
        a = r["associative_scan"]
        print(
            f"first {a['epochs']} epochs of the parallel path: {a['median_epoch_s']:.3f} s "
            f"per epoch with the associative scan, {a['default_scan_median_epoch_s']:.3f} "
            f"with {r['linear_scan']}"
        )
    for when in ("init", "trained"):
        d = r["diagnose"][when]
        pred, meas = d["predicted_steps"], d["measured_steps"]
        print(
            f"diagnose ({when}): LLE mean {d['lle']['mean']:.3f} "
            f"[{d['lle']['min']:.3f}, {d['lle']['max']:.3f}], regime {d['regime']}, "
            f"recommended {d['recommended']}\n"
            f"  DEER steps predicted {pred['DEER']['mean']:.1f}, measured "
            f"{meas['DEER']['mean']:.1f} (max {meas['DEER']['max']}); quasi-DEER predicted "
            f"{pred['QuasiDEER']['mean']:.1f}, measured {meas['QuasiDEER']['mean']:.1f} "
            f"(max {meas['QuasiDEER']['max']})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/results/gunpoint_cpu.json")
    parser.add_argument("--plot", default="docs/img/gunpoint_loss.png")
    parser.add_argument("--associative-epochs", type=int, default=3)
    args = parser.parse_args()
    main(
        args.epochs,
        args.batch_size,
        args.lr,
        args.seed,
        args.json,
        args.plot,
        args.associative_epochs,
    )
