"""Triton kernels of disco-kernels, installed as ``disco_kernels.triton_kernels``.

Import only after checking that Triton is importable; ``disco_kernels`` never
imports this package at its own import time.
"""
