"""Builds ddim_fast._C from csrc/: C++ CPU kernels always; CUDA kernels and their torch bindings only
when the installed torch has CUDA and nvcc is found (the reason is printed when they are skipped).

Build with `pip install --no-build-isolation -e .`: an isolated build would install a fresh torch
(from PyPI: the multi-GB CUDA build) into a throwaway environment and compile against it instead of
the torch you run with. MAX_JOBS caps ninja's parallel compile jobs.
"""

import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def cuda_skip_reason():
    """None when the CUDA kernels can be built, else why not."""
    if os.environ.get("DDIM_FAST_NO_CUDA", "0") == "1":
        return "DDIM_FAST_NO_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA (no CUDA headers to build against)"
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    if not nvcc or not os.path.exists(nvcc):
        return "nvcc was not found (set CUDA_HOME)"
    return None


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    if os.environ.get("DDIM_FAST_SKIP_BUILD", "0") == "1":
        # scripts/setup_env.sh installs the package (editable) without compiling, then builds the
        # extension once with `setup.py build_ext --inplace`, incrementally, in the checkout's build/.
        print("ddim_fast: DDIM_FAST_SKIP_BUILD=1: extension not built here (run setup.py build_ext --inplace)")
        return None
    cpu_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    # -fopenmp: at::parallel_for is an OpenMP pragma inside ATen's headers (torch's CPU builds use the
    # OpenMP backend); compiled without it, every parallel_for in our kernels silently runs on one thread.
    # With GCC the library needs libgomp.so.1, which resolves to the copy torch already loaded (same soname).
    # No -std flag: torch's cpp_extension picks the standard its headers need (torch 2.14 needs C++20).
    # The C++ ABI torch was built with, explicitly: recent cpp_extension no longer passes it, and a compiler
    # whose default differs would build a library that cannot link against torch.
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(getattr(torch._C, '_GLIBCXX_USE_CXX11_ABI', True))}"
    cxx_flags = ["-O3", "-fopenmp", abi]
    link_flags = ["-fopenmp"]
    # libstdc++ first among the libraries (torch's come after): torch's libraries export copies of libstdc++
    # code (their GCC toolset links it statically), and a library listed before libstdc++ would lend the
    # extension some std:: functions (std::ostringstream's constructor, for one) while libstdc++ serves the
    # rest. Listed first, every std:: symbol resolves to the one C++ runtime (docs/design.md, "Build").
    libraries = ["stdc++"]
    reason = cuda_skip_reason()
    if reason is not None:
        print(f"ddim_fast: building the C++ CPU kernels only; CUDA kernels skipped: {reason}")
        return CppExtension("ddim_fast._C", cpu_sources, include_dirs=include_dirs, libraries=libraries,
                            extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags)
    cuda_sources = sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST")
    nvcc_flags = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", abi]
    if not arch_list:
        nvcc_flags += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    print(f"ddim_fast: building C++ CPU and CUDA kernels (CUDA {torch.version.cuda}, nvcc from {CUDA_HOME})")
    return CUDAExtension("ddim_fast._C", cpu_sources + cuda_sources, include_dirs=include_dirs, libraries=libraries,
                         define_macros=[("DDIM_FAST_WITH_CUDA", "1")],
                         extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags}, extra_link_args=link_flags)


_extension = make_extension()

setup(
    ext_modules=[] if _extension is None else [_extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
