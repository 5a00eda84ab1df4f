from ._solve import solve as solve
from ._transitions import (
    AbstractTransition as AbstractTransition,
    BlockDiagonal as BlockDiagonal,
    Dense as Dense,
    Diagonal as Diagonal,
    Scalar as Scalar,
    Zero as Zero,
)
