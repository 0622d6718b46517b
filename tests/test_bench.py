"""The benchmark runs, checks correctness, reports allocations and names the targets it misses."""
import json

from cbn import bench


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert bench.main(["--shapes", "2x8x4x4,3x5x40x40,4x5x30", "--threads", "1", "--budget", "0.01",
                       "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["op"] for r in rows} == {"train", "eval", "backward"} and len(rows) == 18
    cases = {(tuple(r["shape"]), r["layout"]) for r in rows}
    assert cases == {((2, 8, 4, 4), "NCHW"), ((2, 8, 4, 4), "channels-last"), ((3, 5, 40, 40), "NCHW"),
                     ((3, 5, 40, 40), "channels-last"), ((4, 5, 30), "NCHW"), ((4, 5, 30), "NLC")}
    for r in rows:
        assert r["correct"] and r["cbn_us"] > 0 and r["roofline_us"] > 0 and r["numpy_us"] > 0
        # with out= nothing of input size is allocated (kernel scratch and (C,) statistics only)
        assert r["alloc_bytes_out"] < 16e3, r
    assert "targets (float32)" in capsys.readouterr().out


def test_target_misses_names_each_miss():
    def row(op, ratio, torch=None, us=5.0, numpy_us=None):
        return {"shape": [2, 8, 4, 4], "layout": "NCHW", "dtype": "float32", "threads": 1, "op": op, "MB": 2.0,
                "cbn_over_roofline": ratio, "alloc_bytes_out": 0, "torch_over_cbn": torch, "cbn_us": us,
                "numpy_us": numpy_us}
    ok = [row("train", 1.9, 2.5, 9.0, 100.0), row("eval", 1.1), row("backward", 1.9, 1.6, 9.0, 100.0)]
    assert bench.target_misses(ok) == []
    bad = [row("train", 2.5, 1.0, 12.0, 100.0), row("eval", 1.3), row("backward", 1.9, 1.6, 9.0, 100.0)]
    misses = bench.target_misses(bad)
    assert len(misses) == 5, misses
    assert any("train 2.50x roofline" in m for m in misses) and any("eval 1.30x" in m for m in misses)
    assert any("PyTorch" in m for m in misses) and any("12.0 us > 10 us" in m for m in misses)
    assert any("9.5x faster than the NumPy reference" in m for m in misses)
