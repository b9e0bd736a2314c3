"""Reference models for the demo and examples.

    from disco_kernels.models import NormEverywhereLM, ModelConfig, PRESETS
    model = NormEverywhereLM("proxy")              # or NormEverywhereLM(ModelConfig(dim=512, ...))
    loss = model(tokens, targets)                  # tokens, targets: (batch, seq) int64

``PRESETS``: "tiny" (dim 32, 2 layers; tests), "small" (dim 128, 4 layers; CPU demo),
"proxy" (dim 256, 4 layers, 4 heads: the paper's small proxy shape); byte vocab (256).
"""
from .norm_everywhere import PRESETS, ModelConfig, NormEverywhereLM, rms_norm

__all__ = ["ModelConfig", "NormEverywhereLM", "PRESETS", "rms_norm"]
