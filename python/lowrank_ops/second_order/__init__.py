"""Second-order approximations: inverse-Hessian(-Fisher)-vector products (M-FAC) and
Hessian traces per parameter block (Hutchinson, HAWQ-V2's sensitivity)."""
from .hessian_trace import HessianTraceResult, hessian_trace
from .mfac import MFACInverse

__all__ = ["MFACInverse", "hessian_trace", "HessianTraceResult"]
