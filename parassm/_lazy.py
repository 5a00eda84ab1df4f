"""Public names imported on first use (PEP 562), so that importing a namespace does not
import JAX: `parassm --help` answers at once, and `from parassm import DEER` imports what
`DEER` needs."""

import importlib
import sys
from collections.abc import Callable, Iterable


def attach(
    package: str, submodules: Iterable[str], names: dict[str, Iterable[str]]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for the module `package`. `submodules`: its public
    subpackages; `names`: for each module (relative to `package`), the public names it
    defines. A name is imported on its first use, then kept in the namespace."""
    submodules = frozenset(submodules)
    home = {name: module for module, group in names.items() for name in group}

    def __getattr__(name: str) -> object:
        if name in submodules:
            return importlib.import_module(f"{package}.{name}")
        if name not in home:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home[name], package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | submodules | set(home))

    return __getattr__, __dir__
