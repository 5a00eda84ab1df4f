"""Parallel-in-time evaluation of nonlinear recurrences.

Every public name is imported on first use (`_lazy.py`), so that `import parassm` and
the `parassm` command's help do not import JAX; the imports under `TYPE_CHECKING` say
what each name is for type checkers and IDEs (`tests/test_imports.py` checks that they
name what `__getattr__` imports)."""

import importlib.metadata
import typing

from . import _lazy


if typing.TYPE_CHECKING:
    from . import diagnostics as diagnostics, linear as linear, nn as nn, systems as systems
    from ._adjoint import (
        AbstractAdjoint as AbstractAdjoint,
        AbstractLinearSolver as AbstractLinearSolver,
        DenseScan as DenseScan,
        ImplicitAdjoint as ImplicitAdjoint,
        QuasiScan as QuasiScan,
        SequentialScan as SequentialScan,
        UnrolledAdjoint as UnrolledAdjoint,
    )
    from ._auto import Auto as Auto
    from ._evaluate import evaluate as evaluate, scan as scan
    from ._jit import (
        clear_programs as clear_programs,
        set_program_cache_size as set_program_cache_size,
    )
    from ._sharding import Sharded as Sharded, ShardedScan as ShardedScan
    from ._solution import RESULTS as RESULTS, Solution as Solution
    from ._solvers._base import AbstractSolver as AbstractSolver
    from ._solvers._parallel import AbstractParallelSolver as AbstractParallelSolver
    from ._solvers._rules import (
        KeepFront as KeepFront,
        KeepVerified as KeepVerified,
        RestartAtRest as RestartAtRest,
        RestartBlownUp as RestartBlownUp,
        RestartInPhase as RestartInPhase,
        RestartOnStall as RestartOnStall,
        ReuseMaps as ReuseMaps,
        Rules as Rules,
    )
    from ._solvers._search import (
        AbstractSearch as AbstractSearch,
        Backtracking as Backtracking,
        FixedDamping as FixedDamping,
        TrustRegion as TrustRegion,
        Undamped as Undamped,
    )
    from ._solvers.block import BlockQuasiDEER as BlockQuasiDEER
    from ._solvers.deer import (
        AbstractJacobian as AbstractJacobian,
        DEER as DEER,
        ExactJacobian as ExactJacobian,
        FunctionJacobian as FunctionJacobian,
    )
    from ._solvers.elk import ELK as ELK, QuasiELK as QuasiELK
    from ._solvers.jacobi import Jacobi as Jacobi
    from ._solvers.picard import Picard as Picard
    from ._solvers.quasi_deer import (
        AbstractDiagonal as AbstractDiagonal,
        ExactDiagonal as ExactDiagonal,
        FunctionDiagonal as FunctionDiagonal,
        HutchinsonDiagonal as HutchinsonDiagonal,
        QuasiDEER as QuasiDEER,
    )
    from ._solvers.sequential import Sequential as Sequential
    from ._solvers.shooting import MultipleShooting as MultipleShooting
    from ._solvers.window import SlidingWindow as SlidingWindow
    from .diagnostics import diagnose as diagnose, Diagnosis as Diagnosis


__getattr__, __dir__ = _lazy.attach(
    __name__,
    ("diagnostics", "linear", "nn", "systems"),
    {
        "._adjoint": (
            "AbstractAdjoint",
            "AbstractLinearSolver",
            "DenseScan",
            "ImplicitAdjoint",
            "QuasiScan",
            "SequentialScan",
            "UnrolledAdjoint",
        ),
        "._auto": ("Auto",),
        "._evaluate": ("evaluate", "scan"),
        "._jit": ("clear_programs", "set_program_cache_size"),
        "._sharding": ("Sharded", "ShardedScan"),
        "._solution": ("RESULTS", "Solution"),
        "._solvers._base": ("AbstractSolver",),
        "._solvers._parallel": ("AbstractParallelSolver",),
        "._solvers._rules": (
            "KeepFront",
            "KeepVerified",
            "RestartAtRest",
            "RestartBlownUp",
            "RestartInPhase",
            "RestartOnStall",
            "ReuseMaps",
            "Rules",
        ),
        "._solvers._search": (
            "AbstractSearch",
            "Backtracking",
            "FixedDamping",
            "TrustRegion",
            "Undamped",
        ),
        "._solvers.block": ("BlockQuasiDEER",),
        "._solvers.deer": ("AbstractJacobian", "DEER", "ExactJacobian", "FunctionJacobian"),
        "._solvers.elk": ("ELK", "QuasiELK"),
        "._solvers.jacobi": ("Jacobi",),
        "._solvers.picard": ("Picard",),
        "._solvers.quasi_deer": (
            "AbstractDiagonal",
            "ExactDiagonal",
            "FunctionDiagonal",
            "HutchinsonDiagonal",
            "QuasiDEER",
        ),
        "._solvers.sequential": ("Sequential",),
        "._solvers.shooting": ("MultipleShooting",),
        "._solvers.window": ("SlidingWindow",),
        ".diagnostics": ("diagnose", "Diagnosis"),
    },
)

__version__ = importlib.metadata.version("parassm")
