"""Linear algebra: randomized and batched SVD, CholeskyQR2, error estimates, effective rank."""
from ..ops.svd import BatchedSVDResult, batched_svd
from .qr import cholesky_qr2
from .rankme import effective_rank
from .rsvd import RSVDResult, RSVDResultWithError, lowrank_error, range_finder, rsvd
from .svd_backward import thin_svd_backward

__all__ = [
    "rsvd", "RSVDResult", "RSVDResultWithError", "range_finder", "batched_svd", "BatchedSVDResult", "lowrank_error", "cholesky_qr2", "effective_rank",
    "thin_svd_backward",
]
