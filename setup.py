"""Build script: packages `src/rankwise` with every subpackage under it (found, not
listed, so a new subpackage cannot be left out of the wheel), `kernels/` (as
`rankwise.kernels`) and `examples/` (as `rankwise.examples`: the example configs and
the quickstart's sample data, which `rankwise init` writes out), and compiles the
C++ extension `rankwise._C` from `csrc/` against the torch of the build.

In a development environment install with ``pip install --no-build-isolation -e .``
(or build a wheel with ``pip wheel --no-build-isolation --no-deps .``) so the
extension is built against the torch already there. A plain ``pip install .``
builds in an isolated environment with the newest torch the index offers; since
the compiled extension works only with the torch it was built against, the
wheel's requirement on torch is that release series (``torch==X.Y.*``, from the
build's ``torch.__version__``), so pip installs a torch the extension can load.

The C++ standard is the one torch's ``BuildExtension`` picks for the torch being
built against (C++17 for older releases, C++20 for those whose headers require
it): no ``-std=`` flag is given here, since any fixed one breaks one or the other.

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

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension

# The run-time requirements; torch is added by _torch_requirement().
DEPENDENCIES = [
    "triton>=3.0; platform_system == 'Linux'",
    "transformers>=4.45",
    "datasets>=2.20",
    "safetensors>=0.4",
    "tokenizers>=0.19",
    "bitsandbytes>=0.45",
    "pyyaml>=6.0",
    "tqdm>=4.60",
    "numpy>=1.24",
    "matplotlib>=3.7",
]


def _torch_requirement() -> str:
    """``torch==X.Y.*`` for the torch being built against: the extension's C++ ABI is that series'."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"torch=={major}.{minor}.*"


def _extension():
    """``rankwise._C``: every ``csrc/*.cpp``, with OpenMP on Linux, in the C++ standard torch chooses."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cxx = ["-O3"]  # no -std=: BuildExtension adds the standard this torch's headers need
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
        """Compile ``ext``, or copy ``$RANKWISE_PREBUILT_EXT`` into its place when that is set."""
        prebuilt = os.environ.get("RANKWISE_PREBUILT_EXT")
        if not prebuilt:
            return super().build_extension(ext)
        if not os.path.isfile(prebuilt):
            raise SystemExit(f"RANKWISE_PREBUILT_EXT: no such file: {prebuilt}")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(prebuilt, target)


def main() -> None:
    """Run setuptools with the packages, the extension and its build command."""
    setup(
        # examples/data holds no module: it is listed as a (namespace) package so setuptools ships its files
        packages=find_packages("src") + ["rankwise.kernels", "rankwise.examples", "rankwise.examples.data"],
        package_dir={"": "src", "rankwise.kernels": "kernels", "rankwise.examples": "examples"},
        package_data={"rankwise.examples": ["*.yaml"], "rankwise.examples.data": ["*.jsonl"],
                      "rankwise.world": ["bases/*.json", "bases/*/*"]},  # the shipped pretrained bases
        install_requires=[_torch_requirement()] + DEPENDENCIES,
        ext_modules=[_extension()],
        cmdclass={"build_ext": BuildExt},
    )


# setuptools runs this file as __main__ (pip, `python -m build`, `python setup.py`); the tests import it.
if __name__ == "__main__":
    main()
