"""Power iteration for the largest singular value of (m, n) or (b, m, n) W.

Per iteration, with v a unit vector:  u = W v;  v' = Wᵀ u;
sigma = ||v'|| / ||u||;  v = v' / ||v'||   (v kept where W v = 0).
Pass the returned v back in to warm-start the next call. sigma and v are
float32 (float64 for float64 W).
"""
from __future__ import annotations

import torch

from .. import _backend, reference
from .._validate import real_tensor
from ..reference import default_start_vector

KERNELS = ("torch", "triton", "cuda")
CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def power_iteration(W: torch.Tensor, v: torch.Tensor | None = None, iters: int = 1, *, backend: str = "auto"):
    """Return (sigma, v): the sigma_max estimate(s) and the right singular vector estimate(s)."""
    if not isinstance(W, torch.Tensor):
        raise TypeError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.dim() not in (2, 3):
        raise ValueError(f"W must be (m, n) or (b, m, n), got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise TypeError(f"W must be a floating-point tensor, got dtype {W.dtype}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be a positive int, got {iters!r}")
    acc = torch.promote_types(W.dtype, torch.float32)
    if v is None:
        v = default_start_vector(W)
    else:
        real_tensor(v, "v")
        if v.shape != W.shape[:-2] + W.shape[-1:]:
            raise ValueError(f"v must have shape {tuple(W.shape[:-2] + W.shape[-1:])} for W of shape {tuple(W.shape)}, "
                             f"got {tuple(v.shape)}")
        if v.numel() and not torch.compiler.is_compiling():  # (one host sync; a traced warm start is the caller's)
            norms = torch.linalg.vector_norm(v.double(), dim=-1)
            if not ((norms > 0) & norms.isfinite()).all():
                raise ValueError("v must be a finite non-zero start vector per matrix (a zero v gives sigma = 0)")
    v = v.to(device=W.device, dtype=acc).contiguous()
    _backend.check_backend(backend)
    return torch.ops.disco_kernels.power_iteration(W, v, iters, backend)


def _torch(W, v, iters):
    return reference.power_iteration(W.to(v.dtype), v, iters)


def cuda_unsupported(W: torch.Tensor) -> str | None:
    """Why the CUDA kernel cannot take W (None when it can)."""
    max_n = _backend.cuda_extension().power_iteration_max_n
    if W.dtype not in CUDA_DTYPES:
        return f"the CUDA kernel reads float32, bfloat16 or float16, got {W.dtype}"
    if W.size(-1) > max_n:
        return f"the CUDA kernel keeps a row in registers: n <= {max_n}, got n = {W.size(-1)}"
    if W.numel() == 0:
        return "W is empty"
    return None


def _cuda(W, v, iters):
    ext = _backend.cuda_extension()
    W3 = W.reshape(-1, *W.shape[-2:]).contiguous()
    if W3.data_ptr() % 16:  # 128-bit loads need 16-byte aligned storage
        W3 = W3.clone()
    b, m, n = W3.shape
    v_in = v.reshape(b, n)
    v_out, sigma = torch.empty_like(v_in), v.new_empty(b)
    ws = v.new_empty(ext.power_iteration_workspace(b, m, n))
    ext.power_iteration(ext.DTYPES[str(W.dtype).removeprefix("torch.")], W3.data_ptr(), b, m, n, v_in.data_ptr(),
                        v_out.data_ptr(), sigma.data_ptr(), ws.data_ptr(), iters,
                        torch.cuda.current_stream(W.device).cuda_stream)
    return sigma.reshape(W.shape[:-2]), v_out.reshape(v.shape)


def _triton(W, v, iters):
    from ..triton_kernels import power_iteration as kernels
    return kernels.power_iteration(W, v, iters)


_IMPLS = {"torch": _torch, "triton": _triton, "cuda": _cuda}


@torch.library.custom_op("disco_kernels::power_iteration", mutates_args=())
def _power_iteration_op(W: torch.Tensor, v: torch.Tensor, iters: int, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    impl = _backend.resolve(backend, W.device, "power_iteration", KERNELS, lambda: cuda_unsupported(W),
                            f"W of shape {tuple(W.shape)}")
    with _backend.on_device(W.device):
        return _IMPLS[impl](W, v, iters)


@_power_iteration_op.register_fake
def _(W, v, iters, backend):
    return v.new_empty(W.shape[:-2]), torch.empty_like(v)
