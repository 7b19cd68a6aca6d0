"""Compiling the CPU kernels into one shared library per instruction-set variant, and choosing
the variant this CPU runs.

Each variant is built with its own fixed flags (never ``-march=native``), so a library in the
cache runs on any CPU that has that variant's features, whatever machine compiled it. The
cache key is the source, the compiler (path and version), the flags and this CPU's feature
set. The variant is picked at load from the CPU's features (detected by the scalar build's
``megrez_cpu_features``, which also asks the OS whether it saves the wide registers);
``MEGREZ_CPU_VARIANT=NAME`` forces one (tests run every variant the machine can).

All variants give bit-identical results for the quantized products (see quantized.c), so
falling back from a variant the compiler cannot build to the next one changes speed only.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).parent
QUANTIZED = HERE / "quantized.c"
QUANTIZE = HERE / "quantize.c"
FLOAT = HERE / "small_m.c"
POOL = HERE / "pool.c"
DECODE_OPS = HERE / "decode_ops.c"
ROUTING = HERE / "routing.c"
MOE_STEP = HERE / "moe_step.c"
READ_PROBE = HERE / "read_probe.c"
HEADERS = [HERE / "pool.h", HERE / "products.h", HERE / "decode_ops.h", HERE / "routing.h",
           HERE / "lanes.h"]  # part of the cache key: the sources include them
COMMON_FLAGS = ["-O3", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]

# megrez_cpu_features() bits
AVX2, AVX512, AVX512_VNNI, AVX_VNNI = 1, 2, 4, 8
_AVX2 = ["-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]


@dataclass(frozen=True)
class Variant:
    name: str
    flags: tuple[str, ...]
    needs: int            # feature bits the CPU must have
    float_kernels: bool   # small_m.c (AVX2 intrinsics) is part of the build


VARIANTS = {v.name: v for v in (
    Variant("scalar", (), 0, False),
    Variant("avx2", tuple(_AVX2), AVX2, True),
    Variant("avxvnni", tuple(_AVX2 + ["-mavxvnni"]), AVX2 | AVX_VNNI, True),
    Variant("avx512", tuple(_AVX512), AVX2 | AVX512, True),
    Variant("avx512vnni", tuple(_AVX512 + ["-mavx512vnni"]), AVX2 | AVX512 | AVX512_VNNI, True),
)}
PREFERENCE = ("avx512vnni", "avx512", "avxvnni", "avx2", "scalar")


class BuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    root = os.environ.get("MEGREZ_CACHE") or Path.home() / ".cache" / "megrez"
    return Path(root) / "kernels"


def compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


_compiler_ids: dict[str, str] = {}


def _compiler_id(cc: str) -> str:
    if cc not in _compiler_ids:
        try:
            out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            out = ""
        _compiler_ids[cc] = f"{os.path.realpath(shutil.which(cc) or cc)} {out.splitlines()[0] if out else ''}"
    return _compiler_ids[cc]


def sources(variant: Variant) -> list[Path]:
    common = [QUANTIZED, QUANTIZE, POOL, DECODE_OPS, ROUTING, MOE_STEP, READ_PROBE]
    return [*common, FLOAT] if variant.float_kernels else common


def library_path(variant: Variant, cpu_features: int | None, cc: str) -> Path:
    """Where the cache keeps ``variant``'s library: keyed by the sources, the compiler (path and
    version), the flags and the CPU's feature set."""
    key = hashlib.sha256()
    for s in [*sources(variant), *HEADERS]:
        key.update(s.read_bytes())
    key.update("\0".join([_compiler_id(cc), *COMMON_FLAGS, *variant.flags, f"cpu={cpu_features}"]).encode())
    return cache_dir() / f"megrez-{variant.name}-{key.hexdigest()[:16]}.so"


def build(variant: Variant, cpu_features: int | None) -> Path:
    """The library for ``variant``, compiled into the cache unless it is there already."""
    cc = compiler()
    if cc is None:
        raise BuildError("no C compiler (cc) found")
    srcs = sources(variant)
    missing = [str(s) for s in [*srcs, *HEADERS] if not s.is_file()]
    if missing:
        raise BuildError(f"{', '.join(missing)} missing from the installation")
    flags = [*COMMON_FLAGS, *variant.flags]
    target = library_path(variant, cpu_features, cc)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, *map(str, srcs), "-lm", "-lpthread"], capture_output=True, text=True,
                              timeout=300)
        if proc.returncode != 0:
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            raise BuildError(f"{variant.name}: {lines[-1] if lines else f'exit status {proc.returncode}'}")
        os.replace(tmp, target)  # atomic: a concurrent process never loads a half-written file
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"{variant.name}: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


_libs: dict[str, ctypes.CDLL] = {}
_features: int | None = None


def load_variant(name: str) -> ctypes.CDLL:
    """The compiled library of a variant (compiling it if needed); raises BuildError when the
    compiler cannot build it or this CPU cannot run it."""
    if name not in VARIANTS:
        raise BuildError(f"unknown CPU kernel variant {name!r} (one of {', '.join(VARIANTS)})")
    if name in _libs:
        return _libs[name]
    variant = VARIANTS[name]
    if name != "scalar" and variant.needs & ~cpu_features():
        raise BuildError(f"this CPU cannot run the {name} kernels")
    path = build(variant, None if name == "scalar" else cpu_features())
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise BuildError(f"{name}: loading {path.name} failed: {e}") from e
    _libs[name] = lib
    return lib


def cpu_features() -> int:
    """The x86 feature bits of this CPU (0 elsewhere), from the scalar build."""
    global _features
    if _features is None:
        _features = int(load_variant("scalar").megrez_cpu_features())
    return _features


def runnable_variants() -> list[str]:
    """The variants this CPU can run, best first (whether the compiler builds them or not)."""
    try:
        feats = cpu_features()
    except BuildError:
        return []
    return [n for n in PREFERENCE if not VARIANTS[n].needs & ~feats]


def choose() -> tuple[str, ctypes.CDLL]:
    """(variant name, library) for this process: ``MEGREZ_CPU_VARIANT`` if set, else the best
    variant this CPU runs and the compiler builds."""
    forced = os.environ.get("MEGREZ_CPU_VARIANT")
    if forced:
        return forced, load_variant(forced)
    errors = []
    for name in runnable_variants() or ["scalar"]:
        try:
            return name, load_variant(name)
        except BuildError as e:
            errors.append(str(e))
    raise BuildError("; ".join(errors))
