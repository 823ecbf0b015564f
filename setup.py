"""Build rbd_cuda: CPU kernels always, CUDA kernels when torch has CUDA and nvcc is found.

Environment switches:
  RBD_CUDA=auto|0|1        auto (default): build CUDA when possible; 1: require it; 0: skip it
  RBD_EMU=0|1              1: also build rbd_cuda._emu, the CUDA kernels compiled for the CPU over
                           the SIMT emulator (csrc/emu) for the tests (the Makefile's default); 0
                           (default): skip it. It needs no GPU, nvcc or CUDA torch.
  TORCH_CUDA_ARCH_LIST     GPU architectures (default "8.0;9.0"; torch crashes without one
                           on a machine with no GPU)
  CUDA_HOME                toolkit root (default: found from nvcc)
  RBD_NVCC_VERBOSE=1       print ptxas resource usage (registers, spills) per kernel
"""

import glob
import os
import re
import shutil
import subprocess

from setuptools import find_packages, setup


def find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if os.path.exists(os.path.join(root, "bin", "nvcc")) and os.path.exists(
            os.path.join(root, "include", "cuda.h")
        ):
            return root
    return None


mode = os.environ.get("RBD_CUDA", "auto").lower()
if mode not in ("auto", "0", "1"):
    raise SystemExit(f"RBD_CUDA must be auto, 0 or 1, got {mode!r}")
emu = os.environ.get("RBD_EMU", "0")
if emu not in ("0", "1"):
    raise SystemExit(f"RBD_EMU must be 0 or 1, got {emu!r}")

cuda_home = find_cuda_home() if mode != "0" else None
if cuda_home:
    os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def nvcc_major(root):
    """CUDA major version of the toolkit's nvcc ("release 13.0" -> 13), or None."""
    try:
        out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.", out)
    return int(match.group(1)) if match else None


why_not = None
if not cuda_home:
    why_not = "nvcc/CUDA_HOME not found" if mode != "0" else "RBD_CUDA=0"
elif torch.version.cuda is None:
    why_not = f"torch {torch.__version__} has no CUDA"
elif nvcc_major(cuda_home) != int(torch.version.cuda.split(".")[0]):
    # torch refuses to compile with a toolkit of another major version than its own.
    why_not = (f"nvcc in {cuda_home} is CUDA {nvcc_major(cuda_home)}, torch {torch.__version__} "
               f"was built with CUDA {torch.version.cuda}")
with_cuda = why_not is None
if mode == "1" and not with_cuda:
    raise SystemExit(f"RBD_CUDA=1 but the CUDA build is impossible: {why_not}")

root = os.path.dirname(os.path.abspath(__file__))
sources = ["csrc/registration.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp", root_dir=root))
include_dirs = [os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")]
# -ffp-contract=off: vectorised and scalar loops round alike; -fno-math-errno lets sqrt vectorise.
# No -m flags: csrc/cpu/kernels_avx2.cpp and kernels_avx512.cpp select their instruction sets with
# `#pragma GCC target`, and ops_cpu.cpp calls them only on CPUs that have them.
cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno"]
define_macros = []
extension = CppExtension
extra = {}
if with_cuda:
    sources += sorted(glob.glob("csrc/cuda/*.cu", root_dir=root))
    define_macros.append(("RBD_WITH_CUDA", None))
    extension = CUDAExtension
    extra["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("RBD_NVCC_VERBOSE"):
        extra["nvcc"].append("-Xptxas=-v")  # registers, shared memory, spills per kernel

ext_modules = [
    extension(
        name="rbd_cuda._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args={"cxx": cxx_flags, **extra},
        extra_link_args=["-fopenmp"],
    )
]
if emu == "1":
    # The CUDA sources over the emulator, one g++ translation unit (csrc/emu/emu_ops.cpp). The
    # stand-ins for torch's c10/cuda headers come first on the include path. Hidden symbols: the
    # emulated kernels and host code never bind to _C's (CUDA) definitions of the same names.
    ext_modules.append(CppExtension(
        name="rbd_cuda._emu",
        sources=["csrc/emu/emu_ops.cpp"],
        include_dirs=[os.path.join(root, "csrc", "emu", "include"), os.path.join(root, "csrc", "emu")] + include_dirs,
        define_macros=[("RBD_EMU", None)],
        extra_compile_args={"cxx": ["-O2", "-std=c++20", "-fvisibility=hidden", "-Wno-unknown-pragmas"]},
        extra_link_args=["-pthread"],
    ))

print(f"rbd_cuda: building CPU kernels{' and CUDA kernels' if with_cuda else ''}"
      + (f" (CUDA_HOME={cuda_home}, arch list {os.environ['TORCH_CUDA_ARCH_LIST']})" if with_cuda
         else f" only ({why_not})")
      + ("; the emulated CUDA kernels (rbd_cuda._emu)" if emu == "1" else ""))

setup(
    name="rbd_cuda",
    version="0.1.0",
    description="Random Bases Descent: fused Philox random-projection kernels for PyTorch",
    # The library (rbd_cuda) and, beside it, the paper's applications (rbd_experiments).
    packages=find_packages(include=["rbd_cuda", "rbd_cuda.*", "rbd_experiments", "rbd_experiments.*"]),
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension},
    python_requires=">=3.10",
    install_requires=["torch>=2.6", "numpy", "tqdm"],  # tqdm: the applications' progress bars
    entry_points={
        "console_scripts": [
            "rbd-train = rbd_experiments.train:main",
            "rbd-reproduce = rbd_experiments.reproduce:main",
            "rbd-intrinsic-dim = rbd_experiments.intrinsic_dim:main",
            "rbd-data = rbd_experiments.data:main",
        ]
    },
    zip_safe=False,
)
