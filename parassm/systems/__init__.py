"""A zoo of reference recurrences, used by the tests, benchmarks, docs and CLI.

Random weights, initial states and inputs are drawn in the system's own dtype, so a
float32 and a float64 instance are different draws, not one system at two precisions:
`MeanFieldRNN(size=8, g=2.0)` has a largest Lyapunov exponent of about -0.59 per step
in float32 (a stable fixed point; DEER converges in 7 iterations at T = 1000) and about
-0.007 in float64 (marginal; every parallel solver crawls).

The registry (`SYSTEMS`, `get`) imports no JAX; the classes are imported on first use.
"""

import typing

from .. import _lazy
from ._registry import get as get, SYSTEMS as SYSTEMS


if typing.TYPE_CHECKING:
    from ._base import AbstractSystem as AbstractSystem
    from ._flows import Lorenz63 as Lorenz63, TwoWellLangevin as TwoWellLangevin
    from ._maps import Henon as Henon, Logistic as Logistic, Tent as Tent
    from ._rnns import (
        GRU as GRU,
        MeanFieldRNN as MeanFieldRNN,
        S5WordProblem as S5WordProblem,
        TanhRNN as TanhRNN,
    )


__getattr__, __dir__ = _lazy.attach(
    __name__,
    (),
    {
        "._base": ("AbstractSystem",),
        "._flows": ("Lorenz63", "TwoWellLangevin"),
        "._maps": ("Henon", "Logistic", "Tent"),
        "._rnns": ("GRU", "MeanFieldRNN", "S5WordProblem", "TanhRNN"),
    },
)
