"""The native extension: built from csrc/ with torch's own cpp_extension the first time it is used on a machine,
then loaded from the cache; and the choice of its ISA path.

Compiled on first use rather than at install: an editable install (`pip install -e`, what `make install` does) has
no build step for C++ sources, a wheel built elsewhere would be compiled for another CPU and torch, and a failed
compile must leave glmserve running on the torch references, which a failed install could not. The cache key is
the sources, torch's version, the compiler's version and the flags, so a change of any of them rebuilds.

Environment:
- GLMSERVE_KERNELS=torch: never build or load the extension; every kernel runs its torch reference.
- GLMSERVE_KERNEL_ISA=avx512_vnni|avx512|avx2|portable: the code path the kernels take (default: the fastest this
  CPU has). Which paths quantize activations: avx512_vnni (vpdpbusd) and avx2 (vpmaddubsw + vpmaddwd, with
  llama.cpp's sign trick for int8 weights, so no int16 sum saturates) multiply int8 / int4 weights by activations
  quantized to int8 with one scale per row, on every call (csrc/isa_avx2_int.cpp's quantizer, shared by both):
  int32 sums over all of K against int8 weights with one scale per row (as fbgemm's dynamic int8 linear), one fp32
  conversion per vector and weight group against grouped weights. benchmarks/activation_quant_accuracy.py measures
  what that costs a whole model. Every other format, and avx512 and portable for every format, keep fp32
  activations and widen the weights to fp32 in registers, so GLMSERVE_KERNEL_ISA=avx512 keeps them for int8 / int4.
- GLMSERVE_AMX=0: prefill's per-channel int8 GEMM (kernels.int8_channel_gemm) takes torch's _int_mm even on a CPU
  with AMX int8 tiles (default: the tiles wherever the ISA is avx512_vnni and the CPU and OS allow them).
- GLMSERVE_CACHE_DIR: where builds are kept (default ~/.cache/glmserve).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
from pathlib import Path
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("ops.cpp", "isa_portable.cpp", "isa_avx2.cpp", "isa_avx2_int.cpp", "isa_avx512.cpp",
           "isa_avx512_vnni.cpp", "paged_attention.cpp", "attention_isa_portable.cpp", "attention_isa_avx2.cpp",
           "attention_isa_avx512.cpp", "fused_step.cpp", "decoder_stack.cpp", "int8_gemm_amx.cpp", "silu_isa_avx2.cpp",
           "moe_grouped.cpp")
# -fopenmp: at::parallel_for splits work over torch's threads only where _OPENMP is defined (ATen/ParallelOpenMP.h);
# without it every kernel ran on the calling thread alone. Linking it names libgomp.so.1, the runtime torch has
# already loaded, so both share one thread pool and torch.set_num_threads.
CFLAGS = ("-O3", "-Wall", "-Wno-unused-function", "-fopenmp")
LDFLAGS = ("-fopenmp",)
ISAS = ("portable", "avx2", "avx512", "avx512_vnni")  # slowest first; each ISA's index is its number in csrc/isa.h
# The ISAs whose int8 / int4 products quantize the activations to int8 as well (integer dot products).
INT8_ACTIVATION_ISAS = ("avx2", "avx512_vnni")


def _put_ninja_on_path() -> None:
    """cpp_extension runs `ninja` from PATH; pip installs it beside the venv's python, which `make test` runs
    without activating the venv."""
    if shutil.which("ninja") is None:
        import ninja

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _compiler_version() -> str:
    compiler = os.environ.get("CXX", "c++")
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise RuntimeError(f"no C++ compiler ({compiler}): {error}") from error


def build_key() -> str:
    """Changes with the sources, torch, the compiler and the checkout's path: cpp_extension's ninja file names the
    sources by absolute path, so two checkouts sharing one build directory would rebuild it for each other."""
    digest = hashlib.sha256(str(CSRC.resolve()).encode())
    for name in sorted(p.name for p in CSRC.iterdir()):
        digest.update(name.encode() + (CSRC / name).read_bytes())
    digest.update(f"{torch.__version__}|{_compiler_version()}|{' '.join(CFLAGS + LDFLAGS)}".encode())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("GLMSERVE_CACHE_DIR", Path.home() / ".cache" / "glmserve")) / "kernels"


@contextlib.contextmanager
def _build_lock(build_dir: Path):
    """Held around cpp_extension's load. Its own lock is a file that a killed or interrupted build leaves behind, and
    it then waits for that file forever; this one is an flock, which the kernel releases when its holder dies. Every
    glmserve process takes it first, so a baton file found while holding it is a dead build's, and is removed."""
    with open(build_dir / "build.flock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            baton = build_dir / "lock"
            if baton.exists():
                logger.warning("removed the lock of an interrupted kernel build: %s", baton)
                baton.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def extension() -> ModuleType | None:
    """The built extension, or None (with one warning saying why) when kernels run on torch."""
    if os.environ.get("GLMSERVE_KERNELS", "native") == "torch":
        logger.info("GLMSERVE_KERNELS=torch: kernels run on their torch references")
        return None
    try:
        from torch.utils.cpp_extension import load

        _put_ninja_on_path()
        key = build_key()
        build_dir = cache_dir() / key
        build_dir.mkdir(parents=True, exist_ok=True)
        with _build_lock(build_dir):
            return load(name=f"glmserve_kernels_{key}", sources=[str(CSRC / s) for s in SOURCES],
                        extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                        build_directory=str(build_dir), verbose=False)
    except Exception as error:  # any failed build (no compiler, no ninja, headers) leaves the torch path
        logger.warning("glmserve's native kernels are unavailable, so they run on torch (slower): %s", error)
        return None


def available_isas() -> tuple[str, ...]:
    ext = extension()
    return tuple(ext.available_isas()) if ext is not None else ()


@functools.cache
def default_isa() -> str | None:
    """GLMSERVE_KERNEL_ISA if set (it must be one this CPU runs), else the fastest this CPU runs."""
    available = available_isas()
    if not available:
        return None
    wanted = os.environ.get("GLMSERVE_KERNEL_ISA")
    if wanted is None:
        return available[-1]
    if wanted not in available:
        raise ValueError(f"GLMSERVE_KERNEL_ISA={wanted}: this CPU runs {', '.join(available)}")
    return wanted


def fp32_activation_isa() -> str | None:
    """The fastest ISA this CPU runs whose int8 / int4 products keep the activations fp32 (they widen the weights),
    the reference the integer paths are held to; None without the extension."""
    keep = [isa for isa in available_isas() if isa not in INT8_ACTIVATION_ISAS]
    return keep[-1] if keep else None


@functools.cache
def _amx_int8_ready() -> bool:
    ext = extension()
    return ext is not None and ext.amx_int8_ready()


def int8_tiles(isa: str | None = None) -> bool:
    """Whether int8_channel_gemm's sums come from AMX tiles on this ISA path (csrc/int8_gemm_amx.cpp). Asked for
    every quantized product's path (prefill_gemm.native_max_rows), so the CPU's answer is kept."""
    return (isa or default_isa()) == "avx512_vnni" and os.environ.get("GLMSERVE_AMX") != "0" and _amx_int8_ready()


def isa_index(isa: str | None) -> int:
    return ISAS.index(isa or default_isa())
