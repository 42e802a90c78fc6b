"""airun's own C++ CPU kernels (``airun/csrc/*.cpp``), registered as ``torch.ops.airun_int4``, ``airun_int8``, ``airun_attn``,
``airun_fused``, ``airun_lora`` and ``airun_layer``.

They are compiled on first use with PyTorch's C++ extension builder (a C++ compiler and ``ninja`` are needed) into
``<airun cache>/torch_extensions/native_<hash>``, keyed by the sources, flags and PyTorch version, so a changed source
rebuilds and an unchanged one loads in well under a second. They need an x86 CPU with AVX-512 (F, BW, VL) and VNNI.
Where that is missing, the build fails, or ``AIRUN_NATIVE_KERNELS=0``, :func:`available` is False and every layer
runs its PyTorch path instead: same results within each kernel's documented error, slower. Decode attention uses
AVX512-BF16 dot products for bfloat16 caches where the CPU has them (``AIRUN_BF16_DOT=0`` turns that off).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

log = logging.getLogger("airun.native")

SOURCES = ("int4_vnni.cpp", "int8_vnni.cpp", "decode_attention.cpp", "fused_ops.cpp", "lora.cpp", "decoder_layer.cpp")
_CSRC = Path(__file__).resolve().parent / "csrc"
# -fopenmp: at::parallel_for is a header template that runs serially unless compiled with OpenMP. The library then
# links libgomp.so.1, which resolves to the copy PyTorch already loaded (same soname): one thread pool.
CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mf16c", "-mfma", "-std=c++17", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "f16c", "fma")


def cpu_has_flags() -> bool:
    """Whether /proc/cpuinfo lists every instruction set the kernels are compiled for."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return all(f in flags for f in CPU_FLAGS)
    return False


@functools.cache
def available() -> bool:
    """Whether the kernels are loaded, building them on the first call of the process (under a minute, once per source
    change). False, with the reason logged, when disabled, unsupported by the CPU, or the build fails."""
    if os.environ.get("AIRUN_NATIVE_KERNELS", "1") == "0":
        log.info("native kernels disabled by AIRUN_NATIVE_KERNELS=0")
        return False
    if not cpu_has_flags():
        log.info("this CPU lacks AVX-512 VNNI: airun's native kernels are off, PyTorch's kernels run instead")
        return False
    if shutil.which("ninja") is None:  # the pip package's binary, when the venv's bin is not on PATH
        try:
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
    try:
        from torch.utils import cpp_extension

        from airun.loader.demo import default_cache_dir

        paths = [_CSRC / name for name in SOURCES]
        headers = sorted(_CSRC.glob("*.h"))  # included by the sources: part of what a build is keyed on
        key = "".join(p.read_text() for p in [*paths, *headers]) + " ".join(CFLAGS) + torch.__version__
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        build = default_cache_dir() / "torch_extensions" / f"native_{digest}"
        if not (build / f"airun_native_{digest}.so").exists():
            log.warning("building airun's native CPU kernels once (under a minute) into %s", build)
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=f"airun_native_{digest}",
            sources=[str(p) for p in paths],
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            build_directory=str(build),
            is_python_module=False,
            verbose=False,
        )
    except Exception as exc:  # no compiler, no ninja, no headers: run PyTorch's kernels instead
        log.warning("could not build airun's native CPU kernels (%s); using PyTorch's kernels", exc)
        return False
    return True
