"""Instruction-set levels: every level this machine runs gives bitwise the same results as the baseline build;
CBN_CPU_LEVEL forces a level, falls back with a warning, rejects an unknown name; show_config names the level."""
import contextlib
import io
import json
import os
import platform
import struct
import textwrap

import pytest

import cbn
from cbn import _dispatch

BUILT = _dispatch.built_levels()
SUPPORTED = _dispatch.supported_levels()
X86_64 = platform.machine().lower() in ("x86_64", "amd64") and struct.calcsize("P") == 8
LEVEL_FLAGS = {"x86-64-v3": ("-march=x86-64-v3", "/arch:AVX2"), "x86-64-v4": ("-march=x86-64-v4", "/arch:AVX512")}

# (class name, shape): small ones (serial), (N, C) rows, many small images, tiles of one channel, and tasks of whole
# channels (>= 4M values of >= 16 channels).
SHAPES = [
    ("BatchNorm1d", (7, 5)),
    ("BatchNorm2d", (2, 3, 5, 4)),
    ("BatchNorm3d", (2, 3, 4, 5, 6)),
    ("BatchNorm1d", (4096, 64)),
    ("BatchNorm1d", (16, 24, 100)),
    ("BatchNorm2d", (8, 3, 64, 64)),
    ("BatchNorm2d", (32, 64, 7, 7)),
    ("BatchNorm2d", (256, 8, 8, 8)),
    ("BatchNorm3d", (2, 8, 8, 32, 32)),
    ("BatchNorm2d", (2, 32, 256, 256)),
    ("BatchNorm2d", (16, 16, 56, 56)),  # in cache: the backward in tasks of 1 channel (_next_run's prefetch)
    ("BatchNorm2d", (16, 256, 7, 7)),  # in cache: the float32 forward of short rows in groups of whole channels
]

SCRIPT = textwrap.dedent("""
    import json, sys, warnings
    import numpy as np
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import cbn
        from cbn import _dispatch

    shapes = {shapes!r}
    out = {{}}
    for i, (name, shape) in enumerate(shapes):
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(i)
            C = shape[1]
            x1 = (rng.standard_normal(shape) * 3 + 1e3).astype(dtype)
            x2 = (rng.standard_normal(shape) * 0.5 + 1e3).astype(dtype)
            dy = rng.standard_normal(shape).astype(dtype)
            bn = getattr(cbn, name)(C, dtype=dtype, momentum=0.1)
            bn.weight[...] = rng.uniform(0.5, 1.5, C)
            bn.bias[...] = rng.uniform(-1, 1, C)
            key = f"{{i}}_{{name}}_{{'x'.join(map(str, shape))}}_{{np.dtype(dtype).name}}_"
            out[key + "y1"] = bn(x1)
            out[key + "dx1"] = bn.backward(dy)
            out[key + "gw1"] = bn.grad_weight.copy()
            out[key + "gb1"] = bn.grad_bias.copy()
            out[key + "y2"] = bn(x2)
            out[key + "dx2"] = bn.backward(dy)
            out[key + "rm"] = bn.running_mean.copy()
            out[key + "rv"] = bn.running_var.copy()
            bn.eval()
            out[key + "ye"] = bn(x1)
            out[key + "dxe"] = bn.backward(dy)
            out[key + "gwe"] = bn.grad_weight.copy()
            out[key + "gbe"] = bn.grad_bias.copy()
    np.savez(sys.argv[1], **out)
    print(json.dumps({{"level": _dispatch.LEVEL, "build": cbn._build_info(),
                      "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}}))
""")


def _run(run_record, tmp_path, level):
    """Run SCRIPT on 2 threads with CBN_CPU_LEVEL=level; return (its report, {name: array})."""
    stdout, arrays = run_record(SCRIPT.format(shapes=SHAPES), tmp_path, level, timeout=600, CBN_CPU_LEVEL=level,
                                OMP_NUM_THREADS=2)
    return json.loads(stdout.strip().splitlines()[-1]), arrays


@pytest.fixture(scope="module")
def baseline(run_record, tmp_path_factory):
    report, arrays = _run(run_record, tmp_path_factory.mktemp("baseline"), "baseline")
    assert report["level"] == "baseline" and not report["warnings"], report
    assert not any(f in report["build"] for flags in LEVEL_FLAGS.values() for f in flags), report["build"]
    return arrays


@pytest.mark.parametrize("level", [lv for lv in _dispatch.LEVELS if lv != "baseline"])
def test_level_bitwise_identical_to_baseline(level, baseline, run_record, tmp_path):
    if level not in BUILT:
        pytest.skip(f"{level} not built for this platform: not compared")
    if level not in SUPPORTED:
        pytest.skip(f"{level} built, but this CPU lacks it: not compared")
    report, arrays = _run(run_record, tmp_path, level)
    assert report["level"] == level and not report["warnings"], report
    assert any(f in report["build"] for f in LEVEL_FLAGS[level]), report["build"]
    assert set(arrays) == set(baseline)
    differ = [k for k in baseline if arrays[k].dtype != baseline[k].dtype or arrays[k].shape != baseline[k].shape
              or arrays[k].tobytes() != baseline[k].tobytes()]
    assert not differ, f"{level} differs from baseline in {len(differ)} of {len(baseline)} arrays: {differ[:10]}"
    print(f"\n{level} vs baseline: {len(baseline)} arrays (outputs, gradients, running statistics of "
          f"{len(SHAPES)} shapes x float32/float64) bitwise identical")


def test_levels_compared():
    """On an x86-64 CPU with AVX2 at least two levels run here; says which levels the comparison covers (skips when
    a level was not built, e.g. by a CBN_BASELINE_ONLY=1 build)."""
    print(f"\nbuilt: {', '.join(BUILT)}; supported by this CPU (compared): {', '.join(SUPPORTED)}")
    assert "baseline" in SUPPORTED
    if not os.environ.get("CBN_CPU_LEVEL", "").strip():
        assert _dispatch.LEVEL == SUPPORTED[-1], "without CBN_CPU_LEVEL the best supported level is used"
    unbuilt = [lv for lv in _dispatch.LEVELS if lv not in BUILT] if X86_64 else []
    if unbuilt:
        pytest.skip(f"{', '.join(unbuilt)} not built (a CBN_BASELINE_ONLY=1 build, or a compiler without the flags; "
                    f"setup.py warned): only {', '.join(BUILT)} compared")
    if X86_64 and _dispatch.cpu_supports("x86-64-v3", _dispatch.cpu_features()):
        assert len(SUPPORTED) >= 2, f"x86-64 CPU with AVX2, but only {SUPPORTED} of the levels built ({BUILT}) run"


def test_fallback_to_lower_level(run_python, tmp_path):
    unusable = [lv for lv in _dispatch.LEVELS if lv not in SUPPORTED]
    if not unusable:
        pytest.skip("every level is built and supported here: nothing to fall back from")
    asked = unusable[-1]
    code = textwrap.dedent("""
        import json, warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import cbn
        print(json.dumps([cbn._dispatch.LEVEL, [str(m.message) for m in w if issubclass(m.category, RuntimeWarning)]]))
    """)
    res = run_python(["-c", code], tmp_path, CBN_CPU_LEVEL=asked, OMP_NUM_THREADS=2)
    assert res.returncode == 0, res.stderr
    level, warned = json.loads(res.stdout.strip().splitlines()[-1])
    assert level == [lv for lv in SUPPORTED if _dispatch.LEVELS.index(lv) < _dispatch.LEVELS.index(asked)][-1]
    assert len(warned) == 1 and asked in warned[0] and f"using {level}" in warned[0], warned


def test_unknown_level_raises(run_python, tmp_path):
    res = run_python(["-c", "import cbn"], tmp_path, CBN_CPU_LEVEL="avx9000")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and "CBN_CPU_LEVEL" in last and "'avx9000'" in last, res.stderr
    assert all(lv in last for lv in _dispatch.LEVELS), last


def test_show_config_names_level():
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cbn.show_config()
    lines = [ln.strip() for ln in buf.getvalue().splitlines()]
    level = [ln for ln in lines if ln.startswith("cpu level:")]
    assert len(level) == 1 and level[0].split()[2] == _dispatch.LEVEL, lines
    assert f"built: {', '.join(BUILT)};" in level[0]
    compiler = [ln for ln in lines if ln.startswith("compiler:")][0]
    assert compiler.endswith(_dispatch.kernels.build_info())
    if _dispatch.LEVEL != "baseline":
        assert any(f in compiler for f in LEVEL_FLAGS[_dispatch.LEVEL]), compiler


# -- the choice itself, on made-up CPU feature tables --------------------------------------------------------------
NUMPY_24_V3 = {"AVX": True, "AVX2": True, "FMA3": True, "X86_V3": True, "AVX512F": False, "X86_V4": False}
OLD_NUMPY_V4 = {"AVX": True, "AVX2": True, "FMA3": True, "F16C": True, "AVX512F": True, "AVX512CD": True,
                "AVX512BW": True, "AVX512DQ": True, "AVX512VL": True}
ARM = {"NEON": True, "ASIMD": True, "ASIMDHP": True}
ALL = list(_dispatch.LEVELS)


@pytest.mark.parametrize("features, best", [
    (NUMPY_24_V3, "x86-64-v3"),
    (OLD_NUMPY_V4, "x86-64-v4"),
    ({**OLD_NUMPY_V4, "AVX512VL": False}, "x86-64-v3"),  # Knights Landing: AVX-512 without VL/BW/DQ
    ({k: v for k, v in OLD_NUMPY_V4.items() if k != "AVX512BW"}, "x86-64-v3"),  # a v4 feature absent: not v4
    ({**OLD_NUMPY_V4, "X86_V4": False}, "x86-64-v3"),  # the summary key wins where present
    ({"AVX": True, "AVX2": True, "FMA3": True, "BMI2": False}, "baseline"),  # present and False
    ({"AVX": True, "AVX2": True}, "baseline"),  # FMA3 absent
    (ARM, "baseline"),
    ({}, "baseline"),  # the table could not be read
], ids=["numpy2.4-v3", "old-numpy-v4", "no-avx512vl", "no-avx512bw-key", "x86-v4-false", "no-bmi2", "no-fma3-key",
        "arm", "no-table"])
def test_choose_best(features, best):
    assert _dispatch.choose("", ALL, features) == (best, None)
    assert _dispatch.choose("", ["baseline"], features) == ("baseline", None)


def test_choose_requested():
    assert _dispatch.choose("baseline", ALL, OLD_NUMPY_V4) == ("baseline", None)
    assert _dispatch.choose("x86-64-v3", ALL, OLD_NUMPY_V4) == ("x86-64-v3", None)
    level, warning = _dispatch.choose("x86-64-v4", ALL, NUMPY_24_V3)
    assert level == "x86-64-v3" and "CBN_CPU_LEVEL=x86-64-v4" in warning and "not supported" in warning
    level, warning = _dispatch.choose("x86-64-v3", ["baseline"], ARM)
    assert level == "baseline" and "x86-64-v3" in warning and "not built" in warning


def test_requested_level(monkeypatch):
    monkeypatch.setenv("CBN_CPU_LEVEL", " x86-64-v3 ")
    assert _dispatch.requested_level() == "x86-64-v3"
    monkeypatch.setenv("CBN_CPU_LEVEL", "")
    assert _dispatch.requested_level() == ""
    monkeypatch.setenv("CBN_CPU_LEVEL", "X86-64-V3")
    with pytest.raises(ValueError, match="baseline, x86-64-v3, x86-64-v4.*'X86-64-V3'"):
        _dispatch.requested_level()
