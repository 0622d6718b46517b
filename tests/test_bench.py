"""The benchmark runs, checks correctness and reports allocations; benches/targets.py names the targets it misses."""
import importlib.util
import json
from pathlib import Path

import pytest

from cbn import bench

TARGETS = Path(__file__).resolve().parent.parent / "benches" / "targets.py"


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--shapes", "2x8x4x4,3x5x40x40,4x5x30", "--threads", "1", "--budget", "0.01",
                       "--small-shapes", "2x8x4x4,8x16", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"train", "eval", "backward"} and len(rows) == 18
    cases = {(tuple(r["shape"]), r["layout"]) for r in rows}
    assert cases == {((2, 8, 4, 4), "NCHW"), ((2, 8, 4, 4), "channels-last"), ((3, 5, 40, 40), "NCHW"),
                     ((3, 5, 40, 40), "channels-last"), ((4, 5, 30), "NCHW"), ((4, 5, 30), "NLC")}
    for r in rows:
        assert r["correct"] and r["cbn_us"] > 0 and r["roofline_us"] > 0 and r["numpy_us"] > 0
        # the ratios take the call into out=; torch/new the call returning a new output, as PyTorch's do
        assert r["cbn_new_us"] > 0 and r["numpy_over_cbn"] == pytest.approx(r["numpy_us"] / r["cbn_us"])
        assert r["torch_over_cbn"] is None or r["torch_over_cbn"] == pytest.approx(r["torch_us"] / r["cbn_us"])
        new = r["torch_over_cbn_new"]
        assert new is None or new == pytest.approx(r["torch_us"] / r["cbn_new_us"])
        # with out= nothing of input size is allocated (kernel scratch and (C,) statistics only)
        assert r["alloc_bytes_out"] < 16e3, r
    printed = capsys.readouterr().out
    assert "cbn us" in printed and "targets" not in printed  # the table, without the project's internal targets
    variants = data["variants"]  # the table of fused ops and training variants, of the same cases
    assert [(tuple(r["shape"]), r["layout"]) for r in variants] == [(tuple(r["shape"]), r["layout"])
                                                                     for r in rows[::3]]
    calls = [f"{op}{v}" for op in ("train", "backward") for v in ("",) + tuple(f"_{v}" for v in bench.VARIANTS)]
    assert all(r[k] > 0 for r in variants for k in calls if k != "backward_precise")
    assert "numpy/fused" in printed and "mask/plain" in printed and "precise/plain" in printed
    small = data["small"]  # per-call times of the small shapes given, against the floor, NumPy and PyTorch
    assert [(tuple(r["shape"]), r["op"]) for r in small] == [(s, op) for s in ((2, 8, 4, 4), (8, 16))
                                                             for op in bench.OPS]
    torch = small[0]["torch_us"] is not None  # PyTorch's module calls when it is installed
    for r in small:
        assert r["threads"] == 1 and r["cbn_us"] > 0 and r["floor_us"] > 0 and r["numpy_us"] > 0
        assert r["cbn_over_floor"] == pytest.approx(r["cbn_us"] / r["floor_us"])
        assert r["numpy_over_cbn"] == pytest.approx(r["numpy_us"] / r["cbn_us"])
        assert (r["torch_us"] is not None) == torch and (r["torch_over_cbn"] is not None) == torch
        if torch:
            assert r["torch_us"] > 0 and r["torch_over_cbn"] == pytest.approx(r["torch_us"] / r["cbn_us"])
    assert "Small shapes (per call, float32)" in printed and "cbn/floor" in printed


def test_bench_small_options(tmp_path, capsys, monkeypatch):
    out = tmp_path / "b.json"
    args = ["--shapes", "2x8x4x4", "--layouts", "NCHW", "--threads", "1", "--budget", "0.001", "--no-variants",
            "--no-reference", "--json", str(out)]
    monkeypatch.setattr(bench, "_torch", lambda threads: None)  # as without torch
    assert bench.main(args + ["--small-shapes", "8x16"]) == 0
    small = json.loads(out.read_text())["small"]
    assert len(small) == 3 and all(r[k] is None for r in small for k in
                                   ("numpy_us", "numpy_over_cbn", "torch_us", "torch_over_cbn"))
    assert "Small shapes" in capsys.readouterr().out
    assert bench.main(args + ["--no-small"]) == 0
    assert json.loads(out.read_text())["small"] == [] and "Small shapes" not in capsys.readouterr().out


def _targets():
    """benches/targets.py as a module (skip where the tests run without the checkout, as in the wheel tests)."""
    if not TARGETS.exists():
        pytest.skip(f"{TARGETS} is not here: the tests run outside the checkout")
    spec = importlib.util.spec_from_file_location("targets", TARGETS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_target_misses_names_each_miss(tmp_path, capsys):
    targets = _targets()
    target_misses = targets.target_misses

    def row(op, ratio, torch=None, us=5.0, numpy_us=None):
        return {"shape": [2, 8, 4, 4], "layout": "NCHW", "dtype": "float32", "threads": 1, "op": op, "MB": 2.0,
                "cbn_over_roofline": ratio, "alloc_bytes_out": 0, "torch_over_cbn": torch, "cbn_us": us,
                "numpy_us": numpy_us}
    ok = [row("train", 1.9, 2.5, 9.0, 100.0), row("eval", 1.1), row("backward", 1.9, 1.6, 9.0, 100.0)]
    assert target_misses(ok) == []
    bad = [row("train", 2.5, 1.0, 12.0, 100.0), row("eval", 1.3), row("backward", 1.9, 1.6, 9.0, 100.0)]
    misses = target_misses(bad)
    assert len(misses) == 5, misses
    assert any("train 2.50x roofline" in m for m in misses) and any("eval 1.30x" in m for m in misses)
    assert any("PyTorch" in m for m in misses) and any("12.0 us > 10 us" in m for m in misses)
    assert any("9.5x faster than the NumPy reference" in m for m in misses)
    (tmp_path / "bad.json").write_text(json.dumps({"header": {}, "rows": bad}))
    assert targets.main([str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().out.startswith("targets (float32): 5 missed\n  ")
