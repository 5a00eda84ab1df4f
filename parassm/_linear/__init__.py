from ._kalman import kalman_filter as kalman_filter, kalman_smoother as kalman_smoother
from ._scan_impl import (
    AbstractScanImpl as AbstractScanImpl,
    AssociativeScan as AssociativeScan,
    ChunkedScan as ChunkedScan,
    default_scan_impl as default_scan_impl,
    LoopScan as LoopScan,
    PallasScan as PallasScan,
    scan_impl as scan_impl,
)
from ._solve import solve as solve
from ._transitions import (
    AbstractTransition as AbstractTransition,
    BlockDiagonal as BlockDiagonal,
    Dense as Dense,
    Diagonal as Diagonal,
    Scalar as Scalar,
    Zero as Zero,
)
