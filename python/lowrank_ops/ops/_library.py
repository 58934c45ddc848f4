"""The one ``torch.library`` namespace that every op family defines its ops in."""
import torch

NAMESPACE = "lowrank_ops"
LIBRARY = torch.library.Library(NAMESPACE, "DEF")


def current_stream(tensor: torch.Tensor) -> int:
    """The raw ``cudaStream_t`` (as an int) that kernels for ``tensor`` must launch on."""
    return torch.cuda.current_stream(tensor.device).cuda_stream
