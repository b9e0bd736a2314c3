"""Packaging promises: import without Triton / the extension / a GPU, the CLI self-check."""
import subprocess
import sys

import pytest
import torch

import disco_kernels as dk


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_without_triton_extension_or_gpu():
    code = """
import sys
sys.modules['triton'] = None            # import triton -> ImportError
sys.modules['disco_kernels._C'] = None  # the extension too
import torch
import disco_kernels as dk
assert not torch.cuda.is_initialized(), 'import touched the GPU'
p = torch.nn.Parameter(torch.randn(4, 6))
p.grad = torch.randn(4, 6)
dk.Scion([p], lr=0.1).step()
print(dk.available_backends('cpu'))
for b in ('triton', 'cuda'):
    try:
        dk.ops.newton_schulz(torch.randn(3, 3), backend=b)
    except RuntimeError as e:
        print(e)
"""
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert "['torch']" in out.stdout
    assert "backend='triton' is unavailable" in out.stdout and "Triton is not importable" in out.stdout
    assert "backend='cuda' is unavailable" in out.stdout


def test_import_does_not_import_triton():
    out = _python("import sys, disco_kernels; print('triton' in sys.modules)")
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_cli_self_check():
    out = subprocess.run([sys.executable, "-m", "disco_kernels"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for op in ("newton_schulz", "power_iteration", "fused_update"):  # every op is checked
        assert f"self-check {op}[torch]" in out.stdout, out.stdout
    assert "FAIL" not in out.stdout
    if not torch.cuda.is_available():  # each backend it cannot use is named, with the reason
        assert "cuda unavailable: " in out.stdout


def test_public_names():
    for name in ("Scion", "ScionLight", "norm_dict", "lmo", "ops", "reference"):
        assert hasattr(dk, name)
    assert dk.lmo.Spectral(max=False, normalized=True, steps=5).steps == 5


@pytest.mark.parametrize("name", ["newton_schulz", "power_iteration", "fused_update"])
def test_ops_are_custom_ops(name):
    import torch
    assert hasattr(torch.ops.disco_kernels, name)
