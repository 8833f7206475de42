"""Build script: packages `src/rankwise` and `kernels/` (as `rankwise.kernels`) and
compiles the C++ extension `rankwise._C` from `csrc/` against the installed torch.

Install with ``pip install --no-build-isolation -e .`` so the extension is built
against the torch already in the environment (an isolated build would fetch another).
"""
import glob
import os
import sys

from setuptools import setup

from torch.utils.cpp_extension import BuildExtension, CppExtension


def _extension():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3", "-std=c++17"]
    link = []
    if sys.platform.startswith("linux"):
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    # The masking ops are CPU code; CUDA tensors go through the Triton kernels,
    # so a CppExtension is enough whether or not CUDA is present.
    return CppExtension(
        name="rankwise._C",
        sources=sources,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


setup(
    packages=["rankwise", "rankwise.kernels"],
    package_dir={"rankwise": "src/rankwise", "rankwise.kernels": "kernels"},
    package_data={"rankwise": ["data/*", "data/**/*"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=False)},
)
