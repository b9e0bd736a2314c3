"""Norm-everywhere Llama-style decoder, the model family of arXiv 2510.03871.

Every linear layer reads its input through a parameter-free RMSNorm,
rms_norm(x) = x / sqrt(mean(x²) + eps) with eps = 1e-20; blocks are pre-norm
residual attention (RoPE, causal) and SwiGLU MLP, with no biases:

    h = x + o(rms_norm(attn(q(n), k(n), v(n))))          n = rms_norm(x)
    x' = h + down(rms_norm(silu(gate(m)) · up(m)))       m = rms_norm(h)
    logits = head(rms_norm(x_L))

Init (the paper's, "norm 1" per layer): embedding rows of ℓ2 norm sqrt(dim);
hidden weights orthogonal × sqrt(d_out / d_in), and × 1/sqrt(2 n_layers) for the
residual-output projections (o, down); head rows of ℓ2 norm 1/sqrt(dim).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from ..lmo import ColNorm, RowNorm, Spectral


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a NormEverywhereLM. ``mlp_dim`` None means 8·dim/3 rounded up to a multiple of 64."""

    vocab_size: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp_dim: int | None = None
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-20

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "mlp_dim" and value is None:
                continue
            if f.name in ("rope_theta", "norm_eps"):
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                    raise ValueError(f"ModelConfig.{f.name} must be a number > 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{f.name} must be a positive int, got {value!r}")
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"ModelConfig.dim ({self.dim}) must be n_heads ({self.n_heads}) times an even head size")

    @property
    def hidden_mlp_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 64 * math.ceil(8 * self.dim / 3 / 64)


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=32, n_layers=2, n_heads=2, max_seq_len=128),     # tests, smoke runs
    "small": ModelConfig(dim=128, n_layers=4, n_heads=2, max_seq_len=256),   # CPU demo
    "proxy": ModelConfig(dim=256, n_layers=4, n_heads=4, max_seq_len=512),   # the paper's small proxy shape
}


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x²) + eps) over the last dim, computed in float32."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) by the position angles."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


class Block(nn.Module):
    """One pre-norm attention + SwiGLU block, RMSNorm before every linear layer."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, h = cfg.dim, cfg.hidden_mlp_dim
        self.n_heads, self.eps = cfg.n_heads, cfg.norm_eps
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down = nn.Linear(h, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, d = x.shape
        n = rms_norm(x, self.eps)
        q, k, v = (lin(n).view(B, T, self.n_heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(_rope(q, cos, sin), _rope(k, cos, sin), v, is_causal=True)
        x = x + self.o(rms_norm(a.transpose(1, 2).reshape(B, T, d), self.eps))
        m = rms_norm(x, self.eps)
        return x + self.down(rms_norm(F.silu(self.gate(m)) * self.up(m), self.eps))


class NormEverywhereLM(nn.Module):
    """Decoder LM: ``model(tokens)`` -> logits (B, T, vocab); ``model(tokens, targets)`` -> mean CE loss."""

    def __init__(self, cfg: ModelConfig | str = "proxy"):
        super().__init__()
        if isinstance(cfg, str):
            if cfg not in PRESETS:
                raise ValueError(f"cfg must be a ModelConfig or one of {sorted(PRESETS)}, got {cfg!r}")
            cfg = PRESETS[cfg]
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"cfg must be a ModelConfig or a preset name, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        half = cfg.dim // cfg.n_heads // 2
        freqs = cfg.rope_theta ** (-torch.arange(half, dtype=torch.float64) / half)
        angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float64), freqs)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The paper's init (module docstring); uses the global RNG."""
        ColNorm(transpose=True).init(self.embed.weight)
        RowNorm(normalized=True).init(self.head.weight)
        spectral = Spectral()
        for block in self.blocks:
            for lin in (block.q, block.k, block.v, block.o, block.gate, block.up, block.down):
                spectral.init(lin.weight)
            for lin in (block.o, block.down):
                lin.weight.mul_(1 / math.sqrt(2 * self.cfg.n_layers))

    def residual_projections(self) -> list[str]:
        """Names of the weights initialised × 1/sqrt(2 n_layers)."""
        return [f"blocks.{i}.{p}.weight" for i in range(self.cfg.n_layers) for p in ("o", "down")]

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        T = tokens.size(1)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"tokens has sequence length {T} > max_seq_len {self.cfg.max_seq_len}")
        x = self.embed(tokens)
        cos, sin = self.cos[:T], self.sin[:T]
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(rms_norm(x, self.cfg.norm_eps))
        if targets is None:
            return logits
        if targets.shape != tokens.shape:
            raise ValueError(f"targets must have the shape of tokens {tuple(tokens.shape)}, got {tuple(targets.shape)}")
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
