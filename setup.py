"""Build the kernels, cbn/_kernels.pyx, once per instruction-set level, with OpenMP when the compiler supports it.

One extension module per level: cbn._kernels_baseline everywhere, and on x86-64 also cbn._kernels_v3 (x86-64-v3:
AVX2, FMA, BMI2) and cbn._kernels_v4 (x86-64-v4: AVX-512), compiled with -march=x86-64-v3/-v4 (MSVC /arch:AVX2,
/arch:AVX512). cbn/_dispatch.py imports the best one the CPU supports (as ATen builds its cpu/ kernels once per
CPU_CAPABILITY). No -march=native: a wheel must run on any CPU of its platform. A level the compiler cannot build
(an old compiler without -march=x86-64-v4, say) is skipped with a warning.

CBN_NO_OPENMP=1 forces a serial build; CBN_REQUIRE_OPENMP=1 makes a missing OpenMP an error instead of a warning
(release wheels). On macOS the OpenMP runtime (libomp) is found through CFLAGS (-I) and LDFLAGS (-L, -Wl,-rpath).
CBN_SANITIZE=1 builds a test build with AddressSanitizer, UBSan and bounds-checked Cython (see .ci/sanitize).

The benchmark's rooflines (a copy and an add, cbn/_roofline.pyx) are a module of their own, cbn._roofline, built at
the baseline level with the same flags: the production kernels do not carry them.
"""
import os
import re
import shlex
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

OPENMP_PROBE = r"""
#include <omp.h>
#include <stdio.h>
int main(void) {
    int n = 0;
    #pragma omp parallel reduction(+:n)
    n += 1;
    printf("%d\n", n > 0);
    return n > 0 ? 0 : 1;
}
"""

# -- instruction-set levels: (name, module suffix, GCC/clang flags, MSVC flags, macros the flags must define) ------
LEVELS = [
    ("baseline", "baseline", [], [], []),
    ("x86-64-v3", "v3", ["-march=x86-64-v3"], ["/arch:AVX2"], ["__AVX2__"]),
    ("x86-64-v4", "v4", ["-march=x86-64-v4"], ["/arch:AVX512"],
     ["__AVX512F__", "__AVX512CD__", "__AVX512BW__", "__AVX512DQ__", "__AVX512VL__"]),
]
X86_64_PROBE = """
#if !(defined(__x86_64__) || defined(_M_X64)) || defined(_M_ARM64EC)
#error "not an x86-64 target"
#endif
"""
# MSVC before Visual Studio 2022 17.0 contracts a*b+c to an FMA under /fp:precise once /arch:AVX2 allows it (no
# command-line switch stops that), which would make its AVX2/AVX-512 levels round differently from the baseline
MSVC_NO_CONTRACT_PROBE = """
#if defined(_MSC_VER) && !defined(__clang__) && _MSC_VER < 1930
#error "this MSVC contracts to FMA under /fp:precise"
#endif
"""
GCC_PROBE = """
#if !defined(__GNUC__) || defined(__clang__)
#error "not GCC"
#endif
"""


def target_arches():
    """Return the CPU architectures the extensions are compiled for (several for a macOS universal2 build).

    macOS: ARCHFLAGS' -arch flags when set (cibuildwheel sets them, and _PYTHON_HOST_PLATFORM, for each arch), else
    the platform tag (_PYTHON_HOST_PLATFORM or the interpreter's: universal2 builds both arches). Elsewhere the
    platform tag: _PYTHON_HOST_PLATFORM for a cross build, VSCMD_ARG_TGT_ARCH in a cross-compiling MSVC environment,
    else the interpreter's (a 32-bit interpreter on a 64-bit kernel builds 32-bit code)."""
    aliases = {"amd64": "x86_64", "x64": "x86_64", "i386": "x86", "i686": "x86", "win32": "x86", "aarch64": "arm64"}
    if sys.platform == "darwin" and re.findall(r"-arch\s+(\S+)", os.environ.get("ARCHFLAGS", "")):
        arches = re.findall(r"-arch\s+(\S+)", os.environ["ARCHFLAGS"])
    elif sys.platform == "win32" and os.environ.get("VSCMD_ARG_TGT_ARCH"):
        arches = [os.environ["VSCMD_ARG_TGT_ARCH"]]
    else:
        tag = os.environ.get("_PYTHON_HOST_PLATFORM") or sysconfig.get_platform()
        arches = [tag if tag == "win32" else tag.rsplit("-", 1)[-1]]
        if arches == ["universal2"]:
            arches = ["arm64", "x86_64"]
        elif arches == ["x86_64"] and struct.calcsize("P") == 4 and not os.environ.get("_PYTHON_HOST_PLATFORM"):
            arches = ["x86"]
    return sorted({aliases.get(a.lower(), a.lower()) for a in arches})


def build_levels():
    """Return the LEVELS built for this target: all on x86-64, baseline alone elsewhere (and for a universal2 build,
    whose one compilation serves both arches: per-arch flags would need clang's -Xarch_x86_64)."""
    arches = target_arches()
    if env_flag("CBN_BASELINE_ONLY"):  # a quicker build for checks that need one level (sanitizer, serial)
        return LEVELS[:1]
    if arches == ["x86_64"]:
        return LEVELS
    if "x86_64" in arches:
        warnings.warn(f"building for several architectures at once ({', '.join(arches)}): baseline kernels only; "
                      f"build each architecture separately (ARCHFLAGS='-arch x86_64') for the AVX2/AVX-512 levels")
    return LEVELS[:1]


def openmp_flags(compiler):
    """Return (compile_args, link_args) for OpenMP with this compiler, as used by scikit-learn."""
    if compiler.compiler_type == "msvc":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return ["-Xpreprocessor", "-fopenmp"], ["-lomp"]
    return ["-fopenmp"], ["-fopenmp"]


def env_flag(name):
    """Return True for NAME=1, False for unset, empty or 0; raise on anything else."""
    value = os.environ.get(name, "").strip()
    if value not in ("", "0", "1"):
        raise RuntimeError(f"{name} must be 1, 0 or unset, got {value!r}")
    return value == "1"


def probe_compile(compiler, source, cflags):
    """Compile ``source`` (C) with ``cflags``; return None when it compiles, else the reason."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source + "\nint cbn_probe(void) { return 0; }\n")
        compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        return None
    except Exception as e:  # any compile failure: the flags or the target do not fit
        return f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def probe_openmp(compiler, cflags, lflags):
    """Compile, link and run a tiny OpenMP program; return None when all three work, else the reason."""
    tmp = tempfile.mkdtemp()
    # distutils links executables without LDFLAGS: pass its search paths and libraries (macOS libomp) explicitly
    ldflags = [f for f in shlex.split(os.environ.get("LDFLAGS", "")) if f.startswith(("-L", "-l", "-Wl,-rpath"))]
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        exe = os.path.join(tmp, "probe")
        compiler.link_executable(objs, exe, extra_preargs=ldflags, extra_postargs=lflags)
        if compiler.compiler_type == "msvc":
            exe += ".exe"
        subprocess.run([exe], check=True, capture_output=True, timeout=60)
        return None
    except Exception as e:  # any failure of compile, link or run means no usable OpenMP
        return f"{type(e).__name__}: {e}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """build_ext that adds optimisation, level and OpenMP flags per compiler and records them for show_config()."""

    def finalize_options(self):
        """Compile the modules (one per instruction-set level) side by side, one compiler per core, unless -j/--parallel
        says otherwise (pip gives no -j)."""
        super().finalize_options()
        if self.parallel is None:
            self.parallel = True

    def build_extensions(self):
        cc = self.compiler
        msvc = cc.compiler_type == "msvc"
        # No FMA contraction: x86-64-v3 has FMA, and a fused a*b+c would round differently from the baseline's.
        # No trapping math (GCC; clang's default): the selects of the fused ReLU and of its mask vectorise (GCC keeps
        # them as branches beside a float-to-double conversion otherwise, 10x slower); no value changes, only
        # which floating-point exception flags a kernel may leave set, which nothing reads.
        # No errno from sqrt (GCC; nothing reads it): the per-channel loops vectorise their square roots.
        base = ["/O2", "/fp:precise"] if msvc else ["-O3", "-ffp-contract=off", "-fno-trapping-math", "-fno-math-errno"]
        if not msvc and probe_compile(cc, GCC_PROBE, []) is None:
            base.append("-fno-tree-loop-distribute-patterns")  # GCC: a copy loop stays loads/stores, not memcpy
        cflags, lflags = openmp_flags(cc)
        no_openmp, require_openmp = env_flag("CBN_NO_OPENMP"), env_flag("CBN_REQUIRE_OPENMP")
        if no_openmp and require_openmp:
            raise RuntimeError("CBN_NO_OPENMP=1 and CBN_REQUIRE_OPENMP=1 contradict each other: set one")
        failure = None if no_openmp else probe_openmp(cc, cflags, lflags)
        if failure and require_openmp:
            raise RuntimeError(f"CBN_REQUIRE_OPENMP=1 but the compiler cannot build and run an OpenMP program "
                               f"with {' '.join(cflags)} | link {' '.join(lflags)}: {failure}")
        if failure:
            warnings.warn(f"OpenMP not available ({failure}): building cbn serially (one thread)")
        if no_openmp or failure:
            cflags, lflags = [], []
        if SANITIZE:
            base, lflags = base + SANITIZE_FLAGS, lflags + SANITIZE_FLAGS
        compiler_name = getattr(cc, "compiler_so", None) or [cc.compiler_type]
        built = []
        for ext in self.extensions:
            name, _, unix_flags, msvc_flags, macros = LEVEL_OF.get(ext.name, LEVELS[0])
            level_flags = msvc_flags if msvc else unix_flags
            if level_flags:
                # the target must be x86-64 and the flags must take effect (MSVC ignores an unknown /arch: value)
                checks = "".join(f"#ifndef {m}\n#error \"{m} not defined\"\n#endif\n" for m in macros)
                failure = probe_compile(cc, X86_64_PROBE + MSVC_NO_CONTRACT_PROBE + checks, level_flags)
                if failure:
                    warnings.warn(f"the compiler cannot build the {name} kernels with {' '.join(level_flags)} "
                                  f"({failure}): skipping that level")
                    continue
            flags = base + level_flags + cflags
            info = f"{os.path.basename(compiler_name[0])} {' '.join(flags)} | link {' '.join(lflags)}".strip()
            ext.extra_compile_args = flags
            ext.extra_link_args = lflags
            ext.define_macros.append(("CBN_BUILD_INFO", '"' + info.replace('"', "") + '"'))
            built.append(ext)
        self.extensions[:] = built
        super().build_extensions()


# -- CBN_SANITIZE=1: ASan + UBSan, and the Cython checks on (bounds, negative indices, uninitialised views) ---------
SANITIZE = env_flag("CBN_SANITIZE")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g", "-O1"]
CHECKS = {"boundscheck": True, "wraparound": True, "initializedcheck": True}


def module_source(pyx, module):
    """Write ``pyx`` as build/levels/<module>.pyx and return that path (the generated C stays out of cbn/).

    Cython names a module's init function (PyInit_<name>) after its file, so each level's module needs a source file
    of its own name. With CBN_SANITIZE=1 the copy has the CHECKS turned on in its ``# cython:`` header (which would
    override cythonize's compiler_directives). The file is rewritten only when its text changes, so that cythonize's
    timestamp check does not translate an unchanged source again."""
    with open(pyx) as f:
        text = f.read()
    if SANITIZE:
        for name in CHECKS:
            text = re.sub(rf"\b{name}\s*=\s*False\b", f"{name}=True", text)
    path = os.path.join("build", "levels", f"{module}.pyx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        with open(path) as f:
            unchanged = f.read() == text
    except OSError:
        unchanged = False
    if not unchanged:
        with open(path, "w") as f:
            f.write(text)
    return path


LEVEL_OF = {f"cbn._kernels_{level[1]}": level for level in build_levels()}  # other modules: baseline
MODULE = {"cbn._roofline": "cbn/_roofline.pyx", **{module: "cbn/_kernels.pyx" for module in LEVEL_OF}}
# ----------------------------------------------------------------------------------------------------------------

extensions = [
    Extension(
        module,
        [module_source(pyx, module.split(".")[-1])],
        include_dirs=[np.get_include()],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    for module, pyx in MODULE.items()
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3, **(CHECKS if SANITIZE else {})}),
    cmdclass={"build_ext": BuildExt},
)
