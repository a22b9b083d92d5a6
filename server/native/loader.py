"""Builds and finds the native custom-op library (server/native/*.c) for this machine.

The library is compiled on first use with the system C compiler into a cache folder keyed
by the sources' hash, so a fresh checkout, an upgrade and a different machine each get their
own build. The kernels pick AVX-512 (with VNNI) or AVX2 at run time (TOKENWIRE_NATIVE_ISA=avx2
forces the latter). Where they cannot be used (no compiler, a CPU without AVX2/FMA/F16C,
onnxruntime older than 1.17) `library()` says why and callers use the onnxruntime-only graph: same
weights, a slower correction path. The choice itself is engine.graph.choose_kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

CHOICES = ("auto", "native", "onnxruntime")


class NativeUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class NativeLibrary:
    path: Path | None
    reason: str  # why it is unavailable ("" when path is set)
    isa: str = ""  # "avx512" or "avx2" when available


_lock = threading.Lock()
_cached: NativeLibrary | None = None


def source_dir() -> Path:
    return Path(__file__).resolve().parent


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("TOKENWIRE_NATIVE_CACHE", Path(base) / "tokenwire" / "native"))


def _sources() -> list[Path]:
    """Every .c of the folder is compiled into the library."""
    return sorted(source_dir().glob("*.c"))


def _digest() -> str:
    """The cache key: every source and header, so any edit gets its own build."""
    h = hashlib.sha256()
    for path in sorted([*source_dir().glob("*.c"), *source_dir().glob("*.h")]):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _compile(target: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise NativeUnavailable("no C compiler (cc, gcc or clang) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, "-O3", "-std=c11", "-shared", "-fPIC", "-fvisibility=hidden", "-o", str(out),
               *(str(p) for p in _sources())]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise NativeUnavailable(f"compiling the native kernels failed: {done.stderr.strip()[-500:]}")
        out.replace(target)  # atomic: concurrent builders each install a complete file


def _find() -> NativeLibrary:
    import onnxruntime as ort

    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    if (major, minor) < (1, 17):
        return NativeLibrary(None, f"onnxruntime {ort.__version__} is older than 1.17")
    target = cache_root() / _digest() / "libtokenwire_ops.so"
    try:
        if not target.is_file():
            _compile(target)
        lib = ctypes.CDLL(str(target))
        lib.tw_native_isa.restype = ctypes.c_char_p
        isa = lib.tw_native_isa().decode()
        if not isa:
            return NativeLibrary(None, "this CPU lacks AVX2, FMA or F16C")
    except (NativeUnavailable, OSError) as exc:
        return NativeLibrary(None, str(exc))
    return NativeLibrary(target, "", isa)


def library() -> NativeLibrary:
    """The usable library (compiled once per process and source version), or why not."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = _find()
        return _cached


def require() -> Path:
    """The library's path; raises NativeUnavailable with the reason when it cannot be used."""
    lib = library()
    if lib.path is None:
        raise NativeUnavailable(lib.reason)
    return lib.path

