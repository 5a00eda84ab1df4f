"""The linear-recurrence layer every solver shares: `s_t = A_t s_{t-1} + b_t`."""

from .._linear import (
    AbstractTransition as AbstractTransition,
    BlockDiagonal as BlockDiagonal,
    Dense as Dense,
    Diagonal as Diagonal,
    Scalar as Scalar,
    solve as solve,
    Zero as Zero,
)
