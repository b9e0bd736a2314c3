"""Build driver: setuptools runs CMake for ``csrc/`` when nvcc is available.

Without nvcc (or with ``DISCO_BUILD_CUDA=0``) the CUDA extension
``disco_kernels._C`` is skipped with a one-line notice and the package stays
usable through its torch and Triton backends.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def find_nvcc():
    if os.environ.get("DISCO_BUILD_CUDA", "1") == "0":
        return None
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def run(self):
        nvcc = find_nvcc()
        if nvcc is None:
            print("disco-kernels: nvcc not found (or DISCO_BUILD_CUDA=0): skipping the CUDA extension disco_kernels._C")
            self.extensions = []
            return
        self.nvcc = nvcc
        super().run()

    def build_extension(self, ext):
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        archs = os.environ.get("DISCO_CUDA_ARCHS", "80;90a")
        cfg = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_CUDA_COMPILER={self.nvcc}",
            f"-DDISCO_CUDA_ARCHS={archs}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if shutil.which("ninja"):
            cfg.append("-GNinja")
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 2))
        subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build_dir), *cfg], check=True)
        subprocess.run(["cmake", "--build", str(build_dir), "-j", jobs], check=True)


setup(ext_modules=[CMakeExtension("disco_kernels._C")], cmdclass={"build_ext": CMakeBuild})
