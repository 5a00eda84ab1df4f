"""docs/examples/gunpoint.py: on a subset of the real data set, one epoch trained with
`parassm.nn.ParallelRNN` gives the same losses as with `jax.lax.scan`."""

import importlib.util
import pathlib

import jax
import numpy as np
import pytest


pytest.importorskip("aeon")
pytest.importorskip("optax")

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "examples" / "gunpoint.py"


def _example():
    spec = importlib.util.spec_from_file_location("gunpoint", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_one_epoch_same_loss_as_lax_scan():
    gunpoint = _example()
    x_train, y_train, x_test, y_test = gunpoint.load_gunpoint()
    assert x_train.shape == (50, 150, 1) and x_test.shape == (150, 150, 1)
    assert set(np.unique(y_train)) == {0, 1}
    data = (x_train[:20], y_train[:20], x_test[:20], y_test[:20])
    runs = []
    with jax.numpy_dtype_promotion("standard"):
        for sequential in (False, True):
            runs.append(
                gunpoint.train(
                    sequential,
                    data,
                    epochs=1,
                    batch_size=10,
                    lr=1e-2,
                    seed=0,
                    hidden=8,
                    log=lambda *_: None,
                )
            )
    parallel, reference = runs
    assert len(parallel["losses"]) == 2
    np.testing.assert_allclose(parallel["losses"], reference["losses"], rtol=1e-4, atol=1e-4)
    assert all(k >= 1 for batch in parallel["newton_steps"] for k in batch)
    assert parallel["test_accuracy"] == pytest.approx(reference["test_accuracy"])
