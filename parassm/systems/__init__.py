"""A zoo of reference recurrences, used by the tests, benchmarks, docs and CLI."""

from ._base import AbstractSystem as AbstractSystem
from ._flows import Lorenz63 as Lorenz63, TwoWellLangevin as TwoWellLangevin
from ._maps import Henon as Henon, Logistic as Logistic, Tent as Tent
from ._registry import get as get, SYSTEMS as SYSTEMS
from ._rnns import (
    GRU as GRU,
    MeanFieldRNN as MeanFieldRNN,
    S5WordProblem as S5WordProblem,
    TanhRNN as TanhRNN,
)
