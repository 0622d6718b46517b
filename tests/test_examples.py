"""examples/seed_claims.py --quick: training with cbn lowers the loss, the result file is well formed, and the CNN
gives PyTorch's losses step for step (when torch is installed; required when CBN_EXPECT_TORCH=1); the committed
results are a full run of the script's current settings."""
import importlib
import importlib.util
import json
import os
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "seed_claims.py"
FIGURES = ["claim1_bn_placement.png", "claim2_convergence_lr.png", "claim3_deep_sigmoid.png",
           "claim4_batch_size.png", "claim5_inference_statistics.png"]


@pytest.fixture(scope="module")
def quick_run(run_python, tmp_path_factory):
    """Run the script with --quick into a temporary folder; return (results, folder)."""
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} is absent: this copy of tests/ came without examples/ (e.g. cibuildwheel's)")
    out = tmp_path_factory.mktemp("seed_claims")
    # (under .ci/sanitize, run_python's environment also preloads libstdc++ for matplotlib's C++ extension)
    run = run_python([SCRIPT, "--quick", "--out", out], out, timeout=600)
    assert run.returncode == 0, f"seed_claims.py --quick failed:\n{run.stdout}\n{run.stderr}"
    return strict_json(out / "seed_claims.json"), out


def strict_json(path):
    """The JSON file at ``path``; NaN and Infinity (which json.loads would accept) fail."""
    def reject(constant):
        raise ValueError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=reject)


def test_training_with_cbn_lowers_the_loss(quick_run):
    results, _ = quick_run
    measured = results["claims"][0]["measured"]
    for placement in ("before", "after"):
        test_loss = measured["test_loss_curve_mean"][placement]   # [0]: before training
        train_loss = measured["train_loss_curve_mean"][placement]
        assert test_loss[-1] < 0.5 * test_loss[0], (placement, test_loss)
        assert train_loss[-1] < train_loss[0], (placement, train_loss)
        assert measured["test_accuracy_curve_mean"][placement][-1] > 0.8, measured["test_accuracy_curve_mean"]


def test_result_file_is_well_formed(quick_run):
    results, out = quick_run
    assert results["quick"] is True and results["wall_time_s"] > 0
    assert [c["id"] for c in results["claims"]] == [1, 2, 3, 4, 5]
    for claim, figure in zip(results["claims"], FIGURES):
        assert isinstance(claim["claim"], str) and isinstance(claim["criterion"], str) and claim["measured"]
        assert claim["checks"] and all(isinstance(v, bool) for v in claim["checks"].values()), claim["checks"]
        assert claim["reproduced"] is all(claim["checks"].values())
        assert claim["figure"] == figure
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    inference = results["claims"][4]["measured"]
    assert inference["training_identical_for_both_momenta"] is True   # running statistics never feed training


def test_pytorch_parity(quick_run):
    if os.environ.get("CBN_EXPECT_TORCH") == "1":
        importlib.import_module("torch")  # CI installed it: a missing torch is a failure, not a skip
    else:
        pytest.importorskip("torch")
    results, out = quick_run
    parity = results["pytorch_parity"]
    assert "skipped" not in parity, parity
    assert parity["steps"] == 20 and len(parity["loss_cbn"]) == len(parity["loss_torch"]) == 20
    assert parity["passed"] is True and parity["max_rel_diff"] <= parity["tolerance_rel"] <= 1e-10, parity
    assert (out / parity["figure"]).is_file()


def _script():
    """examples/seed_claims.py as a module (importing it trains nothing)."""
    spec = importlib.util.spec_from_file_location("seed_claims", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_results_are_a_full_run():
    """examples/results holds a full run of the script as it is now (its FULL settings, its figures): a change to
    the experiments' settings without a new run fails here. Needs no run of its own."""
    if not SCRIPT.is_file():
        pytest.skip(f"{SCRIPT} is absent: this copy of tests/ came without examples/ (e.g. cibuildwheel's)")
    script, folder = _script(), SCRIPT.parent / "results"
    results = strict_json(folder / "seed_claims.json")
    assert results["quick"] is False and results["config"] == script.FULL
    assert [c["id"] for c in results["claims"]] == [1, 2, 3, 4, 5] == [n for n, _ in enumerate(script.FIGURES, 1)]
    for claim, figure in zip(results["claims"], script.FIGURES):
        assert claim["figure"] == figure and claim["reproduced"] is all(claim["checks"].values())
        assert (folder / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (folder / results["pytorch_parity"]["figure"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
