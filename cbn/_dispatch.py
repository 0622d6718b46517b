"""Pick the kernel module for this CPU at import: the kernels are built once per instruction-set level (setup.py).

Levels, lowest first: ``baseline`` (cbn._kernels_baseline, every platform), ``x86-64-v3`` (cbn._kernels_v3: AVX2,
FMA, BMI2; x86-64 only) and ``x86-64-v4`` (cbn._kernels_v4: AVX-512; x86-64 only). The best level that was built and
that the CPU supports is used; CBN_CPU_LEVEL=<level> forces a lower one (like ATen's ATEN_CPU_CAPABILITY). Every
level gives bitwise the same results (fixed lanes and block order, no FMA contraction); only the speed differs.

What the CPU supports comes from NumPy's runtime CPU feature table, which also accounts for the operating system
saving the AVX / AVX-512 register state. A module above what the CPU supports is never imported: code compiled for
x86-64-v4 may use AVX-512 instructions anywhere, its module initialisation included.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import types
import warnings

ENV = "CBN_CPU_LEVEL"
LEVELS = ("baseline", "x86-64-v3", "x86-64-v4")  # lowest first
MODULES = {"baseline": "cbn._kernels_baseline", "x86-64-v3": "cbn._kernels_v3", "x86-64-v4": "cbn._kernels_v4"}
# NumPy's summary key for the level (NumPy >= 2.4), else the features it stands for, each required where NumPy's
# table has it (older tables lack some); (True: the feature must be in the table, False: only where present).
FEATURES = {
    "x86-64-v3": ("X86_V3", {"AVX": True, "AVX2": True, "FMA3": True, "F16C": False, "BMI": False, "BMI2": False,
                             "LZCNT": False, "MOVBE": False}),
    "x86-64-v4": ("X86_V4", {"AVX512F": True, "AVX512CD": True, "AVX512BW": True, "AVX512DQ": True,
                             "AVX512VL": True}),
}


def cpu_features() -> dict[str, bool]:
    """Return NumPy's runtime CPU feature table ({name: bool}), or {} where it cannot be read."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):  # NumPy 2, NumPy 1.25+
        try:
            return dict(importlib.import_module(name).__cpu_features__)
        except Exception:  # not this NumPy's layout, or no table: try the next, else baseline only
            continue
    return {}


def cpu_supports(level: str, features: dict[str, bool]) -> bool:
    """Whether a CPU with the feature table ``features`` runs code built for ``level``."""
    if level == "baseline":
        return True
    key, parts = FEATURES[level]
    if key in features:
        return bool(features[key])
    return all(features.get(f, False) if required else features.get(f, True) for f, required in parts.items())


def built_levels() -> list[str]:
    """Return the names of the levels whose kernel modules were built (found, not imported: see the module notes)."""
    return [level for level in LEVELS if importlib.util.find_spec(MODULES[level]) is not None]


def supported_levels() -> list[str]:
    """Return the names of the levels that were built and that this CPU supports, lowest first."""
    features = cpu_features()
    return [level for level in built_levels() if cpu_supports(level, features)]


def requested_level() -> str:
    """Return CBN_CPU_LEVEL's value ('' for unset or empty); raise ValueError for an unknown level."""
    requested = os.environ.get(ENV, "").strip()
    if requested and requested not in LEVELS:
        raise ValueError(f"{ENV} must be one of {', '.join(LEVELS)} (or unset), got {requested!r}")
    return requested


def choose(requested: str, built: list[str], features: dict[str, bool]) -> tuple[str, str | None]:
    """Return (level, warning or None) for a valid CBN_CPU_LEVEL value ``requested`` ('' for unset), the ``built``
    levels and the CPU feature table ``features``: the best built level the CPU supports, no higher than the one
    requested (baseline when nothing else fits)."""
    usable = [lv for lv in LEVELS if lv == "baseline" or (lv in built and cpu_supports(lv, features))]
    if not requested:
        return usable[-1], None
    if requested in usable:
        return requested, None
    level = [lv for lv in usable if LEVELS.index(lv) < LEVELS.index(requested)][-1]
    why = "was not built" if requested not in built else "is not supported by this CPU"
    return level, f"{ENV}={requested} asked for, but that level {why}: using {level}"


def _load() -> tuple[str, types.ModuleType]:
    requested = requested_level()
    built = built_levels()
    if "baseline" not in built:
        raise ImportError(f"cbn's baseline kernels ({MODULES['baseline']}) are missing: the build is incomplete")
    level, warning = choose(requested, built, cpu_features())
    if warning:
        warnings.warn(warning, RuntimeWarning, stacklevel=2)
    return level, importlib.import_module(MODULES[level])


LEVEL, kernels = _load()
