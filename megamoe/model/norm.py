"""RMSNorm: NVIDIA apex's fused kernel when it is installed, else PyTorch's F.rms_norm."""

import torch
import torch.nn.functional as F
from torch import nn

try:  # NVIDIA apex, built from source by users who have it; optional.
    from apex.normalization import FusedRMSNorm as _ApexRMSNorm
except ImportError:
    _ApexRMSNorm = None


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight, computed in fp32 and cast back (as OLMoE does)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _ApexRMSNorm is not None and x.is_cuda:
            from apex.normalization.fused_layer_norm import fused_rms_norm_affine
            return fused_rms_norm_affine(x, self.weight, self.weight.shape, self.eps)
        y = F.rms_norm(x.float(), self.weight.shape, eps=self.eps).to(x.dtype)
        return self.weight * y
