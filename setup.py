"""Build the one compiled extension, cbn._kernels, with OpenMP when the compiler supports it.

CBN_NO_OPENMP=1 forces a serial build; CBN_REQUIRE_OPENMP=1 makes a missing OpenMP an error instead of a warning
(release wheels). On macOS the OpenMP runtime (libomp) is found through CFLAGS (-I) and LDFLAGS (-L, -Wl,-rpath).
CBN_SANITIZE=1 builds a test build with AddressSanitizer, UBSan and bounds-checked Cython (see .ci/sanitize).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
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
    """build_ext that adds optimisation and OpenMP flags per compiler and records them for show_config()."""

    def build_extensions(self):
        cc = self.compiler
        base = ["/O2", "/fp:precise"] if cc.compiler_type == "msvc" else ["-O3", "-ffp-contract=off"]
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
        info = f"{os.path.basename(compiler_name[0])} {' '.join(base + cflags)} | link {' '.join(lflags)}".strip()
        for ext in self.extensions:
            ext.extra_compile_args = base + cflags
            ext.extra_link_args = lflags
            ext.define_macros.append(("CBN_BUILD_INFO", '"' + info.replace('"', "") + '"'))
        super().build_extensions()


# -- CBN_SANITIZE=1: ASan + UBSan, and the Cython checks on (bounds, negative indices, uninitialised views) ---------
SANITIZE = env_flag("CBN_SANITIZE")
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g", "-O1"]
CHECKS = {"boundscheck": True, "wraparound": True, "initializedcheck": True}


def checked_source(pyx):
    """Copy ``pyx`` to build/sanitize/ with the CHECKS turned on in its ``# cython:`` header (which would override
    cythonize's compiler_directives) and return the copy's path."""
    with open(pyx) as f:
        text = f.read()
    for name in CHECKS:
        text = re.sub(rf"\b{name}\s*=\s*False\b", f"{name}=True", text)
    path = os.path.join("build", "sanitize", os.path.basename(pyx))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return path


KERNELS = checked_source("cbn/_kernels.pyx") if SANITIZE else "cbn/_kernels.pyx"
# ----------------------------------------------------------------------------------------------------------------

extensions = [
    Extension(
        "cbn._kernels",
        [KERNELS],
        depends=["cbn/_reduce.h"],
        include_dirs=[np.get_include(), "cbn"],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
]

setup(
    ext_modules=cythonize(extensions, compiler_directives={"language_level": 3, **(CHECKS if SANITIZE else {})}),
    cmdclass={"build_ext": BuildExt},
)
