"""Build the one compiled extension, cbn._kernels, with OpenMP when the compiler supports it.

CBN_NO_OPENMP=1 forces a serial build; CBN_REQUIRE_OPENMP=1 makes a missing OpenMP an error instead of a warning.
CBN_SANITIZE=1 builds a test build with AddressSanitizer, UBSan and bounds-checked Cython (see .ci/sanitize).
"""
import os
import re
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


def probe_openmp(compiler, cflags, lflags):
    """Compile, link and run a tiny OpenMP program; return True when all three work."""
    tmp = tempfile.mkdtemp()
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        exe = os.path.join(tmp, "probe")
        compiler.link_executable(objs, exe, extra_postargs=lflags)
        if compiler.compiler_type == "msvc":
            exe += ".exe"
        subprocess.run([exe], check=True, capture_output=True, timeout=60)
        return True
    except Exception:  # any failure of compile, link or run means no usable OpenMP
        return False
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class BuildExt(build_ext):
    """build_ext that adds optimisation and OpenMP flags per compiler and records them for show_config()."""

    def build_extensions(self):
        cc = self.compiler
        base = ["/O2", "/fp:precise"] if cc.compiler_type == "msvc" else ["-O3", "-ffp-contract=off"]
        cflags, lflags = openmp_flags(cc)
        if os.environ.get("CBN_NO_OPENMP") == "1":
            cflags, lflags = [], []
        elif not probe_openmp(cc, cflags, lflags):
            if os.environ.get("CBN_REQUIRE_OPENMP") == "1":
                raise RuntimeError("CBN_REQUIRE_OPENMP=1 but the compiler cannot build an OpenMP program")
            warnings.warn("OpenMP not available: building cbn serially (one thread)")
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
SANITIZE = os.environ.get("CBN_SANITIZE") == "1"
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
