"""Predictability diagnostics: Lyapunov exponents, conditioning of the residual system,
step prediction and solver recommendation."""

from ._conditioning import Conditioning as Conditioning, conditioning as conditioning
from ._diagnose import diagnose as diagnose, Diagnosis as Diagnosis
from ._lyapunov import lyapunov_exponents as lyapunov_exponents
from ._predict import Hardware as Hardware
