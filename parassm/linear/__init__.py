"""The linear-recurrence layer every solver shares: `s_t = A_t s_{t-1} + b_t`."""

from .._linear import (
    AbstractScanImpl as AbstractScanImpl,
    AbstractTransition as AbstractTransition,
    AssociativeScan as AssociativeScan,
    BlockDiagonal as BlockDiagonal,
    ChunkedScan as ChunkedScan,
    default_scan_impl as default_scan_impl,
    Dense as Dense,
    Diagonal as Diagonal,
    kalman_filter as kalman_filter,
    kalman_smoother as kalman_smoother,
    LoopScan as LoopScan,
    PallasScan as PallasScan,
    Scalar as Scalar,
    scan_impl as scan_impl,
    solve as solve,
    Zero as Zero,
)
