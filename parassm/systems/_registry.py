from ._base import AbstractSystem
from ._flows import Lorenz63, TwoWellLangevin
from ._maps import Henon, Logistic, Tent
from ._rnns import GRU, MeanFieldRNN, S5WordProblem, TanhRNN


SYSTEMS: dict[str, type[AbstractSystem]] = {
    cls.name: cls
    for cls in (
        Logistic,
        Tent,
        Henon,
        Lorenz63,
        TwoWellLangevin,
        MeanFieldRNN,
        TanhRNN,
        GRU,
        S5WordProblem,
    )
}


def get(name: str, **params) -> AbstractSystem:
    """Build the system registered as `name` (see `SYSTEMS`) with keyword `params`."""
    try:
        cls = SYSTEMS[name]
    except KeyError:
        known = ", ".join(sorted(SYSTEMS))
        raise ValueError(f"Unknown system {name!r}; known systems: {known}.") from None
    return cls(**params)
