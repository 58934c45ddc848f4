"""Linear algebra: randomized and batched SVD, CholeskyQR2, error estimates, effective rank."""
from .svd_backward import thin_svd_backward

__all__ = ["thin_svd_backward"]
