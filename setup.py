"""Build script: packages `src/rankwise` with every subpackage under it (found, not
listed, so a new subpackage cannot be left out of the wheel) and `kernels/` (as
`rankwise.kernels`), and
compiles the C++ extension `rankwise._C` from `csrc/` against the installed torch.

Install with ``pip install --no-build-isolation -e .`` (or build a wheel with
``pip wheel --no-build-isolation --no-deps .``) so the extension is built against
the torch already in the environment (an isolated build would fetch another).

``RANKWISE_PREBUILT_EXT=/path/to/_C.so`` puts that already compiled extension
into the build instead of compiling ``csrc/`` again; the packaging test uses it
to build a wheel in seconds with the extension ``make install`` compiled from the
same sources against the same torch.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

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


# RANKWISE_NINJA=1: compile the sources in parallel with ninja (where it is installed, as on the GPU
# machines' image); the default is setuptools' serial build, which needs nothing more.
class BuildExt(BuildExtension.with_options(use_ninja=os.environ.get("RANKWISE_NINJA") == "1")):
    def build_extension(self, ext):
        prebuilt = os.environ.get("RANKWISE_PREBUILT_EXT")
        if not prebuilt:
            return super().build_extension(ext)
        if not os.path.isfile(prebuilt):
            raise SystemExit(f"RANKWISE_PREBUILT_EXT: no such file: {prebuilt}")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(prebuilt, target)


setup(
    packages=find_packages("src") + ["rankwise.kernels"],
    package_dir={"": "src", "rankwise.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
)
