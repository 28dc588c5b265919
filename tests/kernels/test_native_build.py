"""The extension's build, its cache, the ISA choice, and the torch fallback when it cannot be built."""

import fcntl
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from glmserve.kernels import native

FALLBACK_SCRIPT = """
import logging, torch
logging.basicConfig(level=logging.WARNING)
from glmserve import kernels
from glmserve.kernels import native
x, w = torch.randn(3, 64), torch.randn(20, 64)
q, s = kernels.quantize_int4(w, 32)
for _ in range(2):
    assert torch.equal(kernels.linear(x, q, s, 32), kernels.linear_reference(x, q, s, 32))
ids, weights = torch.tensor([[0, 1], [1, -1], [0, 0]]), torch.rand(3, 2)
w13, w2 = torch.randn(2, 8, 64), torch.randn(2, 64, 4)
out = kernels.moe_experts(x, weights, ids, w13, None, w2, None)
assert torch.equal(out, kernels.moe_experts_reference(x, weights, ids, w13, None, w2, None))
print("extension:", native.extension(), "isas:", native.available_isas())
"""


def run_fallback(tmp_path, **env):
    return subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "GLMSERVE_CACHE_DIR": str(tmp_path), **env})


def test_extension_builds_where_a_compiler_is():
    if os.environ.get("GLMSERVE_KERNELS") == "torch" or not shutil.which(os.environ.get("CXX", "c++")):
        pytest.skip("no C++ compiler here, or GLMSERVE_KERNELS=torch: the torch path is what runs")
    assert native.extension() is not None
    assert native.available_isas()[0] == "portable"
    assert (native.cache_dir() / native.build_key()).is_dir()


def test_the_kernels_loops_run_on_torchs_threads():
    """at::parallel_for, inlined into the extension, runs serially unless it is compiled with OpenMP."""
    if native.extension() is None or (os.cpu_count() or 1) < 2:
        pytest.skip("no extension, or one CPU")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert native.extension().parallel_threads(64) == 2
        torch.set_num_threads(1)
        assert native.extension().parallel_threads(64) == 1
    finally:
        torch.set_num_threads(threads)


def test_without_a_compiler_kernels_run_on_torch_and_say_so_once(tmp_path):
    result = run_fallback(tmp_path, CXX=str(tmp_path / "no-such-compiler"))
    assert result.returncode == 0, result.stderr
    assert "extension: None isas: ()" in result.stdout
    assert result.stderr.count("native kernels are unavailable") == 1, result.stderr


def test_glmserve_kernels_torch_neither_builds_nor_warns(tmp_path):
    result = run_fallback(tmp_path, GLMSERVE_KERNELS="torch")
    assert result.returncode == 0, result.stderr
    assert "extension: None" in result.stdout and "unavailable" not in result.stderr
    assert not (tmp_path / "kernels").exists()


@pytest.mark.parametrize("wanted", [*native.available_isas(), "avx9000"])
def test_glmserve_kernel_isa_forces_a_path_this_cpu_runs(wanted, monkeypatch):
    monkeypatch.setenv("GLMSERVE_KERNEL_ISA", wanted)
    native.default_isa.cache_clear()
    try:
        if wanted in native.available_isas():
            assert native.default_isa() == wanted
        else:
            with pytest.raises(ValueError, match="GLMSERVE_KERNEL_ISA=avx9000: this CPU runs portable"):
                native.default_isa()
    finally:
        native.default_isa.cache_clear()


def test_the_default_path_is_the_fastest_this_cpu_runs(monkeypatch):
    """avx512_vnni included: its int8 activations are the default where the CPU has them (their accuracy on the
    embedded model: benchmarks/activation_quant_accuracy.py)."""
    monkeypatch.delenv("GLMSERVE_KERNEL_ISA", raising=False)
    native.default_isa.cache_clear()
    try:
        assert native.default_isa() == (native.available_isas() or (None,))[-1]
    finally:
        native.default_isa.cache_clear()


def test_a_dead_builds_lock_file_is_removed_under_the_build_lock(tmp_path):
    (tmp_path / "lock").touch()  # what cpp_extension leaves when a build is killed; it would wait for it forever
    with native._build_lock(tmp_path):
        assert not (tmp_path / "lock").exists()


def test_the_build_lock_is_held_across_processes_and_freed_when_its_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from glmserve.kernels import native\n"
        "with native._build_lock(Path(sys.argv[1])):\n"
        "    Path(sys.argv[1], 'held').touch(); time.sleep(600)"), str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "held").exists():
            assert holder.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with open(tmp_path / "build.flock", "a") as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            holder.kill()
            holder.wait()
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel freed it with its holder
    finally:
        holder.kill()


def _functions_disassembled(library: str, namespace: str, name: str) -> dict[str, str]:
    """Each defined function `glmserve::NAMESPACE::NAME<...>` of the built library, by its demangled name, as
    objdump disassembles it."""
    symbols = subprocess.run(["nm", "-C", "-S", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout
    functions = {}
    for line in symbols.splitlines():
        parts = line.split(maxsplit=3)
        if len(parts) == 4 and parts[3].startswith(f"void glmserve::{namespace}::{name}<"):
            start, size = int(parts[0], 16), int(parts[1], 16)
            functions[parts[3]] = subprocess.run(
                ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}", f"--stop-address={start + size}",
                 library], capture_output=True, text=True, check=True).stdout
    return functions


@pytest.mark.parametrize("namespace, name", [("avx512_vnni", "gemm_tile_per_row"), ("avx512_vnni", "gemm_tile"),
                                             ("avx512", "gemm_tile"), ("avx2", "gemm_tile"),
                                             ("avx2_int", "gemm")])
def test_weight_streaming_kernels_keep_their_prefetches(namespace, name):
    """A decode product streams its weights through prefetches placed ahead of the tile it reads, non-temporal ones
    for a single row tile: nothing checks them but the machine code, and GCC 12 once dropped every one from the VNNI
    tiles (a plain `inline` helper), which made a 16-row lm_head 1.6x slower without changing a bit of its output."""
    ext = native.extension()
    if ext is None or not (shutil.which("nm") and shutil.which("objdump")):
        pytest.skip("no native extension, or no binutils to read it")
    functions = _functions_disassembled(ext.__file__, namespace, name)
    if not functions:
        pytest.skip(f"this build has no {namespace} kernels (a compiler without the ISA)")
    for function, code in functions.items():
        assert "prefetchnta" in code, f"{function}: no non-temporal weight prefetch"
