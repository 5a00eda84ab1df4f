"""Predictability diagnostics: Lyapunov exponents, conditioning of the residual system,
step prediction and solver recommendation."""

from ._conditioning import Conditioning as Conditioning, conditioning as conditioning
from ._diagnose import diagnose as diagnose, Diagnosis as Diagnosis
from ._hardware import cache_dir as cache_dir, Hardware as Hardware
from ._lyapunov import lyapunov_exponents as lyapunov_exponents
