"""Linear algebra: randomized (fixed-rank and fixed-accuracy) and batched SVD, randomized PCA, CholeskyQR2,
error estimates, effective rank, CUR decomposition."""
from ..ops.svd import BatchedSVDResult, batched_svd
from .cur import CURResult, cur
from .qr import cholesky_qr2
from .rankme import effective_rank
from .rsvd import RSVDResult, RSVDResultWithError, lowrank_error, pca_lowrank, range_finder, rsvd
from .rsvd_adaptive import AdaptiveRSVDResult, adaptive_rsvd
from .svd_backward import thin_svd_backward

__all__ = [
    "rsvd", "adaptive_rsvd", "AdaptiveRSVDResult", "pca_lowrank", "RSVDResult", "RSVDResultWithError",
    "range_finder", "batched_svd", "BatchedSVDResult", "lowrank_error", "cholesky_qr2", "effective_rank",
    "thin_svd_backward", "cur", "CURResult",
]
