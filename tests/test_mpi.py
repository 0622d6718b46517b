"""SyncBatchNorm under a real MPI: ``mpirun -n 2`` and ``mpirun -n 4`` on tests/mpi_worker.py.

Skipped when mpirun or mpi4py is missing, unless CBN_REQUIRE_MPI=1 (set by .ci/run, which installs both): then a
missing MPI is a failure.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REQUIRED = os.environ.get("CBN_REQUIRE_MPI", "0") not in ("", "0")
BOUND = {"float64": 1e-12, "float32": 2e-6}


def _mpirun():
    """The mpirun command line prefix, or skip (fail when CBN_REQUIRE_MPI is set) if MPI is unavailable."""
    mpirun = shutil.which("mpirun")
    missing = [name for name, ok in (("mpirun", mpirun), ("mpi4py", importlib.util.find_spec("mpi4py"))) if not ok]
    if missing:
        message = f"{' and '.join(missing)} not found (pip install cbn[mpi] and an MPI such as Open MPI)"
        if REQUIRED:
            pytest.fail(f"CBN_REQUIRE_MPI is set but {message}")
        pytest.skip(message)
    version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60).stdout
    # Open MPI refuses more ranks than cores (CI machines may have one or two) and, as root, to run at all.
    return [mpirun, "--oversubscribe"] if "Open MPI" in version else [mpirun]


@pytest.mark.parametrize("ranks", [2, 4])
def test_sync_batchnorm_equals_single_process(ranks, subprocess_env, tmp_path):
    # the ranks import the cbn under test (subprocess_env puts it first on PYTHONPATH), from outside the source tree
    env = subprocess_env(OMP_NUM_THREADS=1, OMPI_ALLOW_RUN_AS_ROOT=1, OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
    cmd = _mpirun() + ["-n", str(ranks), sys.executable, "-m", "mpi4py", os.path.join(HERE, "mpi_worker.py")]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"{' '.join(cmd)} exited with {run.returncode}:\n{run.stdout}\n{run.stderr}"
    lines = [line for line in run.stdout.splitlines() if line.startswith("CBN_MPI_RESULT ")]
    assert len(lines) == 1, f"no result line from rank 0:\n{run.stdout}\n{run.stderr}"
    result = json.loads(lines[0].split(" ", 1)[1])
    assert result["size"] == ranks
    errors = result["worst_relative_error"]
    for quantity in ("y", "dx", "dweight", "dbias", "running_mean", "running_var"):
        for dtype in ("float64", "float32"):
            assert errors[f"{dtype} {quantity}"] <= BOUND[dtype], (dtype, quantity, errors)
    print(json.dumps(errors, indent=1))


def test_import_needs_no_mpi4py_and_says_how_to_get_it(run_python, tmp_path):
    code = ("import sys; sys.modules['mpi4py'] = None\n"  # makes 'import mpi4py' fail
            "import cbn\n"
            "try:\n"
            "    cbn.SyncBatchNorm2d(3)\n"
            "except ImportError as e:\n"
            "    assert 'pip install cbn[mpi]' in str(e), e\n"
            "else:\n"
            "    raise AssertionError('no ImportError')\n"
            "assert cbn.revert_sync_batchnorm([cbn.BatchNorm2d(2)])[0].num_features == 2\n")
    run = run_python(["-c", code], tmp_path)
    assert run.returncode == 0, run.stderr
