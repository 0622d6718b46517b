"""pytest configuration for the cbn test suite: the hypothesis profiles, and the environment of the Python processes
that tests start (fixtures ``subprocess_env`` and ``run_python``)."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import cbn

# -- hypothesis profiles, chosen by HYPOTHESIS_PROFILE -------------------------------------------------------------
# dev (default): quick local runs. ci (.ci/run): 300 examples for each property test. long: a soak run of 5,000 each
# (docs/development/testing.md).
PROPERTY_TESTS_EXAMPLES = {"dev": 50, "ci": 300, "long": 5000}
for _name, _n in PROPERTY_TESTS_EXAMPLES.items():
    settings.register_profile(_name, max_examples=_n, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                                     HealthCheck.large_base_example])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# -- child processes -----------------------------------------------------------------------------------------------
# The folder holding the cbn this process imported (the checkout for an in-place build, site-packages for an
# installed one): children put it first on sys.path, so they test the same build even when started outside the tree.
CBN_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(cbn.__file__)))


def _subprocess_env(**changes):
    """This process's environment for a child Python: the cbn under test first on PYTHONPATH, OMP_THREAD_LIMIT
    removed (it would cap the thread counts the tests ask for), then ``changes`` applied (a value of None removes
    the variable). Under a preloaded AddressSanitizer (.ci/sanitize) libstdc++ is preloaded too: C++ extensions
    (matplotlib, torch) throw and catch exceptions while they are imported, and ASan aborts on __cxa_throw ("CHECK
    failed ... real___cxa_throw") when libstdc++ was not loaded at its start-up."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CBN_PARENT, env.get("PYTHONPATH", "")) if p)
    env.pop("OMP_THREAD_LIMIT", None)
    preload = env.get("LD_PRELOAD", "")
    if "libasan" in preload and "libstdc++" not in preload:
        env["LD_PRELOAD"] = f"{preload} libstdc++.so.6"
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


@pytest.fixture(scope="session")
def subprocess_env():
    """``subprocess_env(**changes)``: the environment for a child process (see ``_subprocess_env``)."""
    return _subprocess_env


@pytest.fixture(scope="session")
def run_python():
    """``run_python(args, cwd, timeout=120, **env_changes)``: run ``sys.executable *args`` in ``cwd`` with the
    child environment and ``env_changes``; return the CompletedProcess (text output captured)."""
    def run(args, cwd, timeout=120, **env_changes):
        return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=_subprocess_env(**env_changes),
                              capture_output=True, text=True, timeout=timeout)
    return run


@pytest.fixture(scope="session")
def run_record(run_python):
    """``run_record(source, folder, name, timeout=300, **env_changes)``: write the record script ``source`` to
    ``folder/name.py`` and run it there (as ``run_python``) with one argument, the path of the .npz file it writes;
    assert that it succeeded; return (its stdout, {array name: array})."""
    def run(source, folder, name, timeout=300, **env_changes):
        script, path = folder / f"{name}.py", folder / f"{name}.npz"
        script.write_text(source)
        res = run_python([script, path], folder, timeout=timeout, **env_changes)
        assert res.returncode == 0, f"{script} exited with {res.returncode}:\n{res.stdout}\n{res.stderr}"
        with np.load(path) as data:
            return res.stdout, {k: data[k] for k in data.files}
    return run
