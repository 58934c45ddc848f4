"""Second-order approximations: inverse-Hessian(-Fisher)-vector products."""
from .mfac import MFACInverse

__all__ = ["MFACInverse"]
