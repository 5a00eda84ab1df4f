"""The registry of reference systems: their names, summaries and parameters, in a module
that imports no JAX, so that the `parassm` command lists and checks them at once. The
classes are imported when `SYSTEMS[name]` or `get(name)` first asks for one."""

import dataclasses
import importlib
from collections.abc import Iterator, Mapping
from typing import Any, TYPE_CHECKING


if TYPE_CHECKING:
    from ._base import AbstractSystem


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter of a system's constructor, as `parassm diagnose --param NAME=VALUE`
    accepts it: its default (a float, int, str or tuple of floats, which gives its
    kind), the strings it may take, and whether it must be positive."""

    default: Any
    choices: tuple[str, ...] = ()
    positive: bool = False

    @property
    def kind(self) -> str:
        """`"float"`, `"int"`, `"str"` or `"vector"` (a tuple of numbers)."""
        return {float: "float", int: "int", str: "str", tuple: "vector"}[type(self.default)]

    def describe(self) -> str:
        if self.kind == "str":
            return "|".join(self.choices) if self.choices else "text"
        if self.kind == "vector":
            return f"{len(self.default)} numbers"
        return ("positive " if self.positive else "") + (
            "integer" if self.kind == "int" else "number"
        )


@dataclasses.dataclass(frozen=True)
class Entry:
    """A registered system: the name of its class in `parassm.systems`, a one-line
    `summary`, and the parameters of its constructor (without `dtype`, and `key`, which
    the command fixes so that results reproduce)."""

    cls: str
    summary: str
    params: dict[str, Param]


REGISTRY: dict[str, Entry] = {
    "logistic": Entry(
        "Logistic",
        "logistic map x -> r x (1 - x); chaotic at r=4 (LLE ln 2)",
        {"r": Param(4.0), "x0": Param(0.3)},
    ),
    "tent": Entry(
        "Tent",
        "tent map x -> mu min(x, 1 - x); LLE ln mu",
        {"mu": Param(1.9), "x0": Param(0.2)},
    ),
    "henon": Entry(
        "Henon",
        "Henon map; chaotic at a=1.4, b=0.3",
        {"a": Param(1.4), "b": Param(0.3), "s0": Param((0.1, 0.1))},
    ),
    "lorenz63": Entry(
        "Lorenz63",
        "one-step map of the Lorenz-63 flow (chaotic)",
        {
            "dt": Param(0.01, positive=True),
            "integrator": Param("rk4", choices=("euler", "rk4")),
            "sigma": Param(10.0),
            "rho": Param(28.0),
            "beta": Param(8.0 / 3.0),
            "s0": Param((1.0, 1.0, 1.0)),
        },
    ),
    "two_well": Entry(
        "TwoWellLangevin",
        "Langevin sampler of a two-well potential (contracting on average)",
        {
            "step": Param(0.01, positive=True),
            "separation": Param(2.0),
            "s0": Param((0.0, 0.0)),
        },
    ),
    "mean_field": Entry(
        "MeanFieldRNN",
        "mean-field RNN s -> W tanh(s) + u; chaotic for gain g above about 1.2",
        {"size": Param(100, positive=True), "g": Param(1.5), "input_scale": Param(0.1)},
    ),
    "tanh_rnn": Entry(
        "TanhRNN",
        "scalar RNN s -> tanh(a s + u); contracting but very nonlinear for large a",
        {"a": Param(3.0), "s0": Param(0.0)},
    ),
    "gru": Entry(
        "GRU",
        "random GRU cell driven by Gaussian inputs",
        {"hidden_size": Param(16, positive=True), "input_size": Param(4, positive=True)},
    ),
    "s5": Entry("S5WordProblem", "products of random 5x5 permutations (LLE 0)", {}),
}


class _Systems(Mapping[str, "type[AbstractSystem]"]):
    """`REGISTRY` as a mapping from names to classes, importing a class when asked."""

    def __getitem__(self, name: str) -> "type[AbstractSystem]":
        return getattr(importlib.import_module(__package__), REGISTRY[name].cls)

    def __iter__(self) -> Iterator[str]:
        return iter(REGISTRY)

    def __len__(self) -> int:
        return len(REGISTRY)

    def __repr__(self) -> str:
        return f"SYSTEMS({', '.join(REGISTRY)})"


SYSTEMS: Mapping[str, "type[AbstractSystem]"] = _Systems()
"""The reference systems by name, as the `parassm` command knows them:
`SYSTEMS["logistic"]` is [`parassm.systems.Logistic`][]. Listing the names imports no
JAX; a class is imported when first asked for."""


def get(name: str, **params) -> "AbstractSystem":
    """Build the system registered as `name` (see `SYSTEMS`) with keyword `params`."""
    if name not in REGISTRY:
        known = ", ".join(sorted(REGISTRY))
        raise ValueError(f"Unknown system {name!r}; known systems: {known}.")
    return SYSTEMS[name](**params)
