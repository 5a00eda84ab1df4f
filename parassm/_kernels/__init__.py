"""Source-tree stand-in for `parassm._kernels`.

The kernels live in the top-level `kernels/` folder. A wheel ships that folder as
`parassm/_kernels/` (pyproject.toml: this file is excluded and `kernels` is
force-included in its place). In a source checkout or an editable install this file is
imported instead: it points the package at `kernels/` and runs that folder's
`__init__.py`, so both layouts expose the same `parassm._kernels`.
"""

import pathlib


_SOURCE = pathlib.Path(__file__).resolve().parents[2] / "kernels"
__path__ = [str(_SOURCE)]
exec(compile((_SOURCE / "__init__.py").read_text(), str(_SOURCE / "__init__.py"), "exec"))
