"""Pallas kernels for the linear-recurrence step, each with the pure-JAX reference it is
tested against. An ordinary package, `parassm_kernels`, shipped in the same distribution
as `parassm` (see kernels/README.md); use them through
`parassm.linear.solve(..., scan_impl=parassm.linear.PallasScan())`."""

from ._block import block_scan as block_scan, MAX_BLOCK_SIZE as MAX_BLOCK_SIZE
from ._diagonal import diagonal_scan as diagonal_scan
from ._reference import (
    block_scan_reference as block_scan_reference,
    diagonal_scan_reference as diagonal_scan_reference,
)
