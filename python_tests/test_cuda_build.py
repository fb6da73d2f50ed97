"""The GPUs the CUDA build covers, checked without a GPU: the default TORCH_CUDA_ARCH_LIST that
cmake/cuda_arch_list.cmake computes from nvcc, and the device code the installed library holds
for each of those architectures (its embedded fatbinaries: native cubins and PTX)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "cmake" / "cuda_arch_list.cmake"
CMAKE = shutil.which("cmake", path=str(Path(sys.executable).parent)) or shutil.which("cmake")
NVCC = next((p for p in (os.environ.get("CUDA_HOME", "") + "/bin/nvcc", "/usr/local/cuda/bin/nvcc")
             if Path(p).is_file()), shutil.which("nvcc"))
NEEDS_NVCC = pytest.mark.skipif(NVCC is None, reason="no nvcc: the build has no CUDA kernels here")


def arch_list(nvcc: str, local_gpu: str = "") -> list[str]:
    result = subprocess.run([CMAKE, f"-DNVCC={nvcc}", f"-DLOCAL_GPU={local_gpu}", "-P", str(SCRIPT)],
                            capture_output=True, text=True, check=True)
    return result.stderr.strip().split(";")  # message() writes to stderr


def fake_nvcc(tmp_path: Path, computes: list[int]) -> str:
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\n" + "".join(f"echo compute_{c}\n" for c in computes))
    path.chmod(0o755)
    return str(path)


def test_default_arch_list_from_what_nvcc_supports(tmp_path):
    """sm_80, sm_90, sm_100, sm_120 where nvcc has them, the local GPU's, and PTX of nvcc's newest."""
    cuda13 = fake_nvcc(tmp_path, [75, 80, 86, 87, 88, 89, 90, 100, 110, 103, 120, 121])
    assert arch_list(cuda13) == ["8.0", "9.0", "10.0", "12.0", "12.1+PTX"]
    assert arch_list(cuda13, "8.6") == ["8.0", "8.6", "9.0", "10.0", "12.0", "12.1+PTX"]
    assert arch_list(cuda13, "12.0") == ["8.0", "9.0", "10.0", "12.0", "12.1+PTX"]
    cuda12_4 = fake_nvcc(tmp_path, [50, 60, 70, 75, 80, 86, 89, 90])
    assert arch_list(cuda12_4) == ["8.0", "9.0+PTX"]


def fatbin_archs(library: Path) -> tuple[set[int], set[int]]:
    """(architectures with native code, architectures with PTX) of every fatbinary embedded in
    library. A fatbinary: a 16-byte header (magic 0xBA55ED50, version, header size, payload size),
    then entries, each a header (kind: 1 PTX, 2 cubin; its header size and padded payload size;
    the sm version at byte 28) and its payload."""
    data = library.read_bytes()
    magic = struct.pack("<I", 0xBA55ED50)
    native, ptx = set(), set()
    position = data.find(magic)
    while position >= 0:
        _version, header_size, fat_size = struct.unpack_from("<HHQ", data, position + 4)
        entry, end = position + header_size, position + header_size + fat_size
        while entry < end:
            kind, _entry_version, entry_header, padded = struct.unpack_from("<HHII", data, entry)
            sm = struct.unpack_from("<I", data, entry + 28)[0]
            (ptx if kind == 1 else native).add(sm)
            entry += entry_header + padded
        position = data.find(magic, end)
    return native, ptx


@NEEDS_NVCC
def test_built_library_holds_code_for_each_architecture():
    import epa_ext._C

    native, ptx = fatbin_archs(Path(epa_ext._C.__file__))
    if not native and not ptx:
        pytest.skip("this build of epa_ext has no CUDA kernels (EPA_EXT_CUDA=OFF)")
    listed = os.environ.get("TORCH_CUDA_ARCH_LIST")  # what the build took instead of the default
    archs = listed.split(";") if listed else arch_list(NVCC)
    expected_native = {int(a.replace("+PTX", "").replace(".", "")) for a in archs}
    expected_ptx = {int(a.replace("+PTX", "").replace(".", "")) for a in archs if a.endswith("+PTX")}
    assert native == expected_native and ptx == expected_ptx, (sorted(native), sorted(ptx), archs)
