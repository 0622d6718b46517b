"""cbn.torch, the PyTorch adapter, against torch's own modules: forward, backward, running statistics, gradcheck,
opcheck, torch.compile, convert/revert, fallbacks and threads (skipped without torch, failed when
CBN_EXPECT_TORCH=1)."""
import copy
import os
import shutil
from pathlib import Path

import pytest

import cbn

from bn_helpers import require_torch

torch = require_torch()
import cbn.torch as ct  # noqa: E402  (needs torch: after the skip)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torch_resnet.py"
# torch's float32 kernels round their own way (x*alpha + beta with alpha, beta in float32): compare to them at float32
# noise, relative to the largest magnitude of each result; float64 tightly.
TOL = {torch.float32: dict(y=2e-5, stat=2e-6, grad=1e-4), torch.float64: dict(y=1e-11, stat=1e-12, grad=1e-10)}
SHAPES = {"1d-NC": (32, 5), "1d-NCL": (8, 5, 9), "2d": (6, 5, 7, 4), "3d": (3, 5, 4, 3, 5)}
TORCH_CLASS = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
CBN_CLASS = {2: ct.BatchNorm1d, 3: ct.BatchNorm1d, 4: ct.BatchNorm2d, 5: ct.BatchNorm3d}
FLAGS = [dict(), dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
         dict(affine=False, track_running_stats=False)]


def channels_last(x):
    """x with its channels last in memory (torch's channels_last / channels_last_3d; NLC memory for (N, C, L))."""
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


LAYOUTS = {"contiguous": lambda x: x, "channels_last": channels_last}


@pytest.fixture(autouse=True)
def _torch_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


@pytest.fixture
def cbn_calls(monkeypatch):
    """The calls into cbn.functional's batch_norm and batch_norm_backward (what the ops run): a list each of the
    thread counts cbn had at them."""
    calls = {"batch_norm": [], "batch_norm_backward": []}
    for name, log in calls.items():
        def spy(*args, _f=getattr(cbn.functional, name), _log=log, **kw):
            _log.append(cbn.get_num_threads())
            return _f(*args, **kw)
        monkeypatch.setattr(cbn.functional, name, spy)
    return calls


@pytest.fixture(params=["eager", "ops"])
def path(request, monkeypatch):
    """The two ways a call runs: "eager" (a plain tensor outside torch.compile: cbn.functional through an
    autograd.Function) and "ops" (every call through the custom ops, as under torch.compile and torch.export)."""
    if request.param == "ops":
        monkeypatch.setattr(ct, "_eager", lambda *tensors: False)
    return request.param


def close(a, b, rel, what):
    """|a - b| <= rel * max(max|b|, 1) elementwise."""
    a, b = a.detach().double(), b.detach().double()
    if b.numel():
        assert float((a - b).abs().max()) <= rel * max(float(b.abs().max()), 1.0), what


def pair(ndim, C, dtype, **flags):
    """A torch module with random affine parameters and the cbn.torch module of the same state."""
    tbn = TORCH_CLASS[ndim](C, dtype=dtype, **flags)
    if tbn.affine:
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            tbn.weight.uniform_(0.5, 1.5, generator=g)
            tbn.bias.uniform_(-0.5, 0.5, generator=g)
    cbn_bn = CBN_CLASS[ndim](C, dtype=dtype, **flags)
    cbn_bn.load_state_dict(tbn.state_dict())
    return tbn, cbn_bn


def compare_step(tbn, cbn_bn, x, dy, what):
    """One forward and backward through both modules: outputs (values, and the strides of the input, which torch
    keeps too except for (N, C, L) in NLC memory), gradients, state."""
    tol = TOL[x.dtype]
    xs = [x.detach().clone(memory_format=torch.preserve_format).requires_grad_() for _ in range(2)]
    ys = [m(xi) for m, xi in zip((tbn, cbn_bn), xs)]
    assert ys[1].dtype == x.dtype and ys[1].stride() == x.stride(), what
    close(ys[1], ys[0], tol["y"], what + " y")
    for m, y in zip((tbn, cbn_bn), ys):
        m.zero_grad()
        y.backward(dy)
    assert xs[1].grad.stride() == x.stride(), what
    close(xs[1].grad, xs[0].grad, tol["grad"], what + " dx")
    if tbn.affine:
        close(cbn_bn.weight.grad, tbn.weight.grad, tol["grad"], what + " dweight")
        close(cbn_bn.bias.grad, tbn.bias.grad, tol["grad"], what + " dbias")
    if tbn.track_running_stats:
        assert int(cbn_bn.num_batches_tracked) == int(tbn.num_batches_tracked), what
        close(cbn_bn.running_mean, tbn.running_mean, tol["stat"], what + " running_mean")
        close(cbn_bn.running_var, tbn.running_var, tol["stat"], what + " running_var")


@pytest.mark.parametrize("flags", FLAGS, ids=lambda f: ",".join(f"{k}={v}" for k, v in f.items()) or "default")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape,layout", [pytest.param(shape, layout, id=f"{name}-{layout}")
                                          for name, shape in SHAPES.items() for layout in LAYOUTS
                                          if len(shape) > 2 or layout == "contiguous"])  # (N, C): one layout
def test_parity_with_torch(shape, layout, dtype, flags, cbn_calls, path):
    """Three training steps then two eval steps on offset, scaled data: y, dx, dweight, dbias, running statistics
    and num_batches_tracked as torch's, outputs and gradients in the input's memory format."""
    g = torch.Generator().manual_seed(1)
    tbn, cbn_bn = pair(len(shape), shape[1], dtype, **flags)
    for mode in ("train",) * 3 + ("eval",) * 2:
        tbn.train(mode == "train")
        cbn_bn.train(mode == "train")
        x = LAYOUTS[layout](torch.randn(shape, dtype=dtype, generator=g) * 3 + 5)
        dy = LAYOUTS[layout](torch.randn(shape, dtype=dtype, generator=g))
        compare_step(tbn, cbn_bn, x, dy, f"{mode} step")
    assert len(cbn_calls["batch_norm"]) == 5 and len(cbn_calls["batch_norm_backward"]) == 5


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_gradcheck(affine, training, layout, path):
    """torch.autograd.gradcheck in float64 of the functional form (cbn's backward), and gradgradcheck (a double
    backward, which goes to torch's native_batch_norm_backward)."""
    g = torch.Generator().manual_seed(2)
    x = LAYOUTS[layout](torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=g) * 2 + 1).requires_grad_()
    params = [torch.rand(2, dtype=torch.float64, generator=g).add_(0.5).requires_grad_(),
              torch.randn(2, dtype=torch.float64, generator=g).requires_grad_()] if affine else [None, None]
    stats = [torch.randn(2, dtype=torch.float64, generator=g), torch.rand(2, dtype=torch.float64, generator=g) + 0.5]

    def f(x, *wb):
        # the running statistics are read (eval) or updated (training) from copies: each call sees the same ones
        mean, var = (s.clone() for s in stats)
        return ct.batch_norm(x, mean, var, *(wb if affine else params), training=training)
    inputs = (x, *params) if affine else (x,)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def op_cases():
    """(op, args) for torch.library.opcheck: each op with and without its optional tensors, contiguous and
    channels_last, float32 and float64."""
    cases = []
    for dtype in (torch.float32, torch.float64):
        for layout, to in LAYOUTS.items():
            g = torch.Generator().manual_seed(3)
            x = to(torch.randn(4, 3, 5, 2, dtype=dtype, generator=g) * 2 + 1)
            w, b, mean = (torch.randn(3, dtype=dtype, generator=g) for _ in range(3))
            var = torch.rand(3, dtype=dtype, generator=g) + 0.5
            xg, wg, bg = (t.clone(memory_format=torch.preserve_format).requires_grad_() for t in (x, w, b))
            save_mean, save_invstd = (torch.rand(3, dtype=torch.float64, generator=g) + 0.5 for _ in range(2))
            dy = to(torch.randn(4, 3, 5, 2, dtype=dtype, generator=g))
            name = f"{dtype}-{layout}"
            cases += [
                pytest.param("batch_norm_train", (xg, wg, bg, mean, var, 0.1, 1e-5), id=f"train-{name}"),
                pytest.param("batch_norm_train", (x, None, None, None, None, 0.1, 1e-5), id=f"train-bare-{name}"),
                pytest.param("batch_norm_eval", (xg, wg, bg, mean, var, 1e-5), id=f"eval-{name}"),
                pytest.param("batch_norm_eval", (x, None, None, mean, var, 1e-5), id=f"eval-bare-{name}"),
                pytest.param("batch_norm_backward", (dy, x, w, save_mean, save_invstd, True), id=f"backward-{name}"),
                pytest.param("batch_norm_backward", (dy, x, None, mean.double(), save_invstd, False),
                             id=f"backward-eval-bare-{name}"),
            ]
    return cases


@pytest.mark.parametrize("op,args", op_cases())
def test_opcheck(op, args):
    """torch.library.opcheck: schema (no undeclared mutation or aliasing), autograd registration, fake tensor and
    AOT dispatch with dynamic shapes."""
    torch.library.opcheck(getattr(torch.ops.cbn, op).default, args)


def small_net():
    """Conv -> BatchNorm2d -> ReLU -> pooling -> BatchNorm1d -> Linear."""
    return torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                               torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.BatchNorm1d(24),
                               torch.nn.Linear(24, 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")  # inductor's
@pytest.mark.skipif(not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_model_matches_eager(cbn_calls, monkeypatch):
    """torch.compile(fullgraph=True) of a converted model (no graph break at the batch norms): training steps and
    an eval forward give the eager model's outputs, gradients and running statistics, with cbn's kernels. Inductor
    (its layout optimisation forced) runs the convolutions channels-last, and cbn's ops (flexible_layout) get their
    outputs as they are, not converted back to the eager model's layout."""
    channels_last_2d = []  # whether each BatchNorm2d input reached cbn.functional channels-last
    monkeypatch.setattr(cbn.functional, "batch_norm", lambda x, *a, _f=cbn.functional.batch_norm, **kw: (
        x.ndim == 4 and channels_last_2d.append(x.strides[1] == x.itemsize), _f(x, *a, **kw))[1])
    torch.manual_seed(4)
    eager = ct.convert(small_net())
    model = copy.deepcopy(eager)
    with torch._inductor.config.patch(force_layout_optimization=True):
        compiled = torch.compile(model, fullgraph=True)
        for i in range(2):
            x = torch.randn(5, 3, 6, 6) * 2 + 1
            ys = [m(x) for m in (eager, compiled)]
            close(ys[1], ys[0], 1e-5, f"step {i} y")
            for y in ys:
                (y * torch.arange(3.0)).sum().backward()
        for (name, p), q in zip(eager.named_parameters(), model.parameters()):
            close(q.grad, p.grad, 1e-5, name)
        for (name, b), c in zip(eager.named_buffers(), model.buffers()):
            close(c, b, 1e-6, name)
        assert len(cbn_calls["batch_norm"]) == 8 and len(cbn_calls["batch_norm_backward"]) == 8
        eager.eval()
        model.eval()
        with torch.no_grad():
            x = torch.randn(5, 3, 6, 6)
            close(compiled(x), eager(x), 1e-5, "eval y")
    assert sorted(channels_last_2d) == [False] * 3 + [True] * 3  # eager's three calls, then the compiled model's


def test_export_sees_the_ops():
    """torch.export of a converted model in eval and in training mode: one cbn op per batch norm in the graph."""
    torch.manual_seed(5)
    model = ct.convert(small_net())
    x = torch.randn(4, 3, 6, 6)
    for training, op in ((False, "cbn.batch_norm_eval"), (True, "cbn.batch_norm_train")):
        model.train(training)
        graph = torch.export.export(model, (x,)).graph_module.code
        assert graph.count(op) == 2, graph


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_jit_trace_records_the_ops(cbn_calls):
    """torch.jit.trace of a converted model records cbn's ops (an eager call's NumPy work would be traced as
    constants): the traced model gives the eager results on another input."""
    torch.manual_seed(6)
    model = ct.convert(small_net()).eval()
    traced = torch.jit.trace(model, torch.randn(4, 3, 6, 6))
    x = torch.randn(4, 3, 6, 6) * 3 + 1
    before = len(cbn_calls["batch_norm"])
    y = traced(x)
    assert len(cbn_calls["batch_norm"]) == before + 2  # the traced model runs cbn's two batch norms
    close(y, model(x), 1e-6, "traced y")


def test_convert_and_revert_round_trip():
    """convert swaps every BatchNorm1d/2d/3d (nested, in Sequential, ModuleList, ModuleDict, a shared one stays
    shared) for cbn's, holding the same parameter and buffer objects; revert swaps back; state_dicts load across."""
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = torch.nn.BatchNorm2d(3)
            self.seq = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), self.shared, torch.nn.BatchNorm3d(3))
            self.lst = torch.nn.ModuleList([torch.nn.BatchNorm1d(4, affine=False), torch.nn.Linear(2, 2)])
            self.dct = torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(5, momentum=None),
                                            "b": torch.nn.Sequential(torch.nn.BatchNorm2d(2,
                                                                                          track_running_stats=False))})
            self.sync = torch.nn.SyncBatchNorm(3)

    net = Net().eval()
    hook_calls = []
    net.dct["a"].register_forward_hook(lambda *a: hook_calls.append(1))
    before = {k: v for k, v in net.state_dict().items()}
    tensors = {k: id(v) for k, v in list(net.named_parameters()) + list(net.named_buffers())}
    assert ct.convert(net) is net
    kinds = {name: type(m) for name, m in net.named_modules(remove_duplicate=False)}
    assert kinds["shared"] is kinds["seq.1"] is ct.BatchNorm2d and net.shared is net.seq[1]
    assert kinds["seq.2"] is ct.BatchNorm3d and kinds["lst.0"] is kinds["dct.a"] is ct.BatchNorm1d
    assert kinds["dct.b.0"] is ct.BatchNorm2d and kinds["sync"] is torch.nn.SyncBatchNorm
    assert all(isinstance(m, torch.nn.BatchNorm1d) for m in (net.lst[0], net.dct["a"]))
    assert not net.seq[1].training and net.dct["a"].momentum is None and net.lst[0].weight is None
    assert {k: id(v) for k, v in list(net.named_parameters()) + list(net.named_buffers())} == tensors
    net.dct["a"](torch.randn(3, 5))
    assert hook_calls == [1]
    saved = net.state_dict()
    assert saved.keys() == before.keys() and all(torch.equal(saved[k], before[k]) for k in saved)
    assert ct.revert(net) is net
    assert type(net.shared) is torch.nn.BatchNorm2d and type(net.dct["b"][0]) is torch.nn.BatchNorm2d
    assert net.shared is net.seq[1]
    fresh = ct.convert(Net())
    fresh.load_state_dict(saved)
    assert all(torch.equal(v, saved[k]) for k, v in fresh.state_dict().items())
    bn = torch.nn.BatchNorm2d(3)
    assert type(ct.convert(bn)) is ct.BatchNorm2d and type(ct.revert(ct.convert(bn))) is torch.nn.BatchNorm2d


def test_optimizer_built_before_convert_trains_the_converted_model(cbn_calls):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ct.convert(model)
    weight = model[1].weight.detach().clone()
    model(torch.randn(8, 4)).pow(2).sum().backward()
    opt.step()
    assert not torch.equal(model[1].weight, weight) and len(cbn_calls["batch_norm_backward"]) == 1


@pytest.mark.parametrize("case", ["float16", "bfloat16 input, float32 module", "meta device", "momentum > 1"])
def test_unsupported_inputs_fall_back_to_torch(case, cbn_calls):
    """Inputs cbn's ops do not take run torch's own batch norm, with torch's result."""
    device = "meta" if case == "meta device" else "cpu"
    tbn = torch.nn.BatchNorm2d(4, momentum=1.5 if case == "momentum > 1" else 0.1, device=device,
                               dtype=torch.float16 if case == "float16" else torch.float32)
    cbn_bn = ct.convert(copy.deepcopy(tbn))
    x = torch.randn(3, 4, 5, 5, device=device).to({"float16": torch.float16, "bfloat16 input, float32 module":
                                                   torch.bfloat16}.get(case, torch.float32))
    y, ty = cbn_bn(x), tbn(x)
    assert not cbn_calls["batch_norm"] and y.device == ty.device and y.dtype == ty.dtype
    if device == "cpu":
        assert torch.equal(y, ty) and torch.equal(cbn_bn.running_var, tbn.running_var)


@pytest.mark.parametrize("case,in_cpp", [("eps=0 in training", False), ("one value per channel", False),
                                         ("eval without statistics", True), ("weight of another size", True),
                                         ("float64 input, float32 weight", True)])
def test_arguments_torch_rejects_raise_torch_errors(case, in_cpp):
    """torch's error, raised by torch (in Python or, ``in_cpp``, in its C++)."""
    preload = os.environ.get("LD_PRELOAD", "")
    if in_cpp and "libasan" in preload and "libstdc++" not in preload:
        pytest.skip("AddressSanitizer preloaded without libstdc++ (.ci/sanitize): a C++ throw aborts (conftest.py)")
    x = torch.randn(1 if case == "one value per channel" else 4, 3, 1, 1,
                    dtype=torch.float64 if case.startswith("float64") else torch.float32)
    stats = (None, None) if case == "eval without statistics" else (torch.zeros(3), torch.ones(3))
    weight = torch.ones(4 if case == "weight of another size" else 3)
    kw = dict(training=case != "eval without statistics", eps=0.0 if case.startswith("eps") else 1e-5)
    with pytest.raises(Exception) as want:
        torch.nn.functional.batch_norm(x, *stats, weight, **kw)
    with pytest.raises(want.type) as got:
        ct.batch_norm(x, *stats, weight, **kw)
    assert str(got.value) == str(want.value)


def test_empty_batch_as_torch(cbn_calls):
    tbn, cbn_bn = pair(4, 3, torch.float32)
    x = torch.randn(0, 3, 4, 4, requires_grad=True)
    y, ty = cbn_bn(x), tbn(x)
    assert y.shape == ty.shape and int(cbn_bn.num_batches_tracked) == int(tbn.num_batches_tracked) == 1
    assert torch.equal(cbn_bn.running_mean, tbn.running_mean) and torch.equal(cbn_bn.running_var, tbn.running_var)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(cbn_bn.weight.grad, torch.zeros(3))


def test_strided_input_and_gradient(cbn_calls):
    """A slice (memory with gaps) and the broadcast gradient of .sum(): copied once, results as torch's, output laid
    out as torch.empty_like(x)."""
    tbn, cbn_bn = pair(4, 3, torch.float64)
    base = torch.randn(6, 3, 8, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    xs = [base[::2, :, 1:7].detach().requires_grad_(), base[::2, :, 1:7].detach().requires_grad_()]
    ys = [m(x) for m, x in zip((tbn, cbn_bn), xs)]
    assert ys[1].stride() == torch.empty_like(xs[1]).stride()
    close(ys[1], ys[0], 1e-12, "y")
    for y in ys:
        y.sum().backward()
    close(xs[1].grad, xs[0].grad, 1e-10, "dx")
    assert len(cbn_calls["batch_norm_backward"]) == 1


@pytest.mark.parametrize("make", [lambda: torch.randn(4, 1, 1, 3).permute(0, 3, 1, 2),
                                  lambda: channels_last(torch.randn(1, 3, 4, 4)), lambda: torch.randn(4, 3, 5, 1)],
                         ids=["NC11-strides-3,1,3,3", "1CHW-channels_last", "NCH1"])
def test_size_one_dimensions_keep_their_strides(make, cbn_calls):
    """y and dx have x's strides, those of its dimensions of size 1 too (as torch.empty_like(x))."""
    x = make().requires_grad_()
    for training in (True, False):
        y = ct.BatchNorm2d(3).train(training)(x)
        y.backward(torch.ones_like(y))
        assert y.stride() == x.stride() and x.grad.stride() == x.stride(), training
        x.grad = None
    assert len(cbn_calls["batch_norm_backward"]) == 2


def test_ops_run_on_torch_thread_count(cbn_calls):
    """The ops run cbn's kernels on torch.get_num_threads() threads (capped, as cbn's count always is, by its
    OpenMP runtime's count), and leave cbn's count of the calling thread as it was."""
    bn = ct.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    want = []
    for n in (1, 2):
        torch.set_num_threads(n)  # (sets the count of an OpenMP runtime that torch and cbn share, if they do)
        before = cbn.get_num_threads()
        cbn.set_num_threads(n)
        want.append(cbn.get_num_threads())
        cbn.set_num_threads(before)
        bn(x).sum().backward()
        assert cbn.get_num_threads() == before
    assert cbn_calls["batch_norm"] == cbn_calls["batch_norm_backward"] == want


def test_eager_calls_keep_torchs_inplace_semantics(cbn_calls):
    """An eager training call leaves the running statistics' version counters as torch's kernel does (unchanged),
    and a backward after the input or the weight was modified in place raises torch's error (the autograd.Function
    saves them)."""
    tbn, cbn_bn = pair(4, 3, torch.float32)
    x = torch.randn(4, 3, 5, 5)
    versions = []
    for m in (tbn, cbn_bn):
        before = (m.running_mean._version, m.running_var._version)
        m(x)
        versions.append((m.running_mean._version - before[0], m.running_var._version - before[1]))
    assert versions == [(0, 0), (0, 0)]
    for modify in ("input", "weight"):
        errors = []
        for m in (tbn, cbn_bn):
            xi = x.clone().requires_grad_()
            xm = xi * 1.0  # a non-leaf that can be modified in place
            y = m(xm)
            with torch.no_grad():
                (xm if modify == "input" else m.weight).add_(1.0)
            with pytest.raises(RuntimeError) as err:
                y.sum().backward()
            errors.append(str(err.value))
        assert all("modified by an inplace operation" in e for e in errors), (modify, errors)
    assert len(cbn_calls["batch_norm_backward"]) == 0


def test_per_channel_tensors_given_new_memory_are_read_anew(cbn_calls):
    """A module's parameters and running statistics given new memory between calls (weight.data replaced, a new
    running_mean buffer, the module moved to float64 and back) are read from it, as torch's module reads them; a
    change in place is seen too."""
    tbn, cbn_bn = pair(4, 3, torch.float32)
    x = torch.randn(4, 3, 5, 5)
    for step in ("first", "weight.data", "in place", "new buffer", "float64", "float32"):
        for m in (tbn, cbn_bn):
            with torch.no_grad():
                if step == "weight.data":
                    m.weight.data = torch.arange(3.0) + 0.5
                elif step == "in place":
                    m.bias.mul_(-2.0)
                elif step == "new buffer":
                    m.running_mean = torch.full((3,), 0.25)
                elif step == "float64":
                    m.double()
                elif step == "float32":
                    m.float()
        xs = x.to(tbn.weight.dtype)
        for training in (True, False):
            for m in (tbn, cbn_bn):
                m.train(training)
            with torch.no_grad():
                close(cbn_bn(xs), tbn(xs), TOL[torch.float32]["y"], f"{step} training={training}")
            for a, b in zip(cbn_bn.buffers(), tbn.buffers()):  # (within float32's: float32 before)
                close(a, b, TOL[torch.float32]["stat"], f"{step} buffers")
    assert len(cbn_calls["batch_norm"]) == 12


def test_eager_backward_reuses_the_forward_where_it_views_the_saved_memory(monkeypatch):
    """An eager training call's first backward reuses the forward's saved state where that views the memory of
    torch's saved tensors (no saved_tensors_hooks, a dense x, neither x's nor the weight's memory replaced since);
    otherwise, and in a retained graph's second backward, it rebuilds it from them. The gradients are torch's either
    way (with a weight replaced before the backward, those of the new weight, as torch's)."""
    reused = []
    monkeypatch.setattr(ct, "_backward", lambda *a, saved=None, _f=ct._backward: reused.append(saved is not None)
                        or _f(*a, saved=saved))
    dy = torch.randn(4, 3, 5, 5)
    for case, want in {"plain": [True], "retained": [True, False], "hooks": [False], "strided": [False],
                       "weight.data": [False]}.items():
        reused.clear()
        tbn, cbn_bn = pair(4, 3, torch.float32)
        x = torch.randn(4, 3, 5, 10) if case == "strided" else torch.randn(4, 3, 5, 5)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        if case == "strided":  # (views with gaps: the forward copies them for the kernels)
            xs = [xi[..., ::2] for xi in xs]
        if case == "hooks":
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
                ys = [m(xi) for m, xi in zip((tbn, cbn_bn), xs)]
        else:
            ys = [m(xi) for m, xi in zip((tbn, cbn_bn), xs)]
        if case == "weight.data":
            for m in (tbn, cbn_bn):
                m.weight.data = torch.tensor([2.0, -1.0, 0.5])
        grads = [torch.autograd.grad(y, (xi, m.weight), dy, retain_graph=case == "retained")
                 for y, xi, m in zip(ys, xs, (tbn, cbn_bn))]
        if case == "retained":
            assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(ys[1], (xs[1], cbn_bn.weight), dy),
                                                          grads[1])), case
        for got, expected, what in zip(grads[1], grads[0], ("dx", "dweight")):
            close(got, expected, TOL[torch.float32]["grad"], f"{case} {what}")
        assert reused == want, case


def test_profiler_sees_eager_calls(cbn_calls):
    """Under the torch profiler an eager call records its forward under the op's name and its backward as the
    autograd node _CbnBatchNormBackward (the events the example counts as batch norm)."""
    bn = ct.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with torch.profiler.profile() as prof:
        bn(x).sum().backward()
        bn.eval()
        with torch.no_grad():
            bn(x)
    names = {e.name for e in prof.events()}
    assert {"cbn::batch_norm_train", "cbn::batch_norm_eval", "_CbnBatchNormBackward"} <= names, names
    assert len(cbn_calls["batch_norm"]) == 2 and len(cbn_calls["batch_norm_backward"]) == 1


def test_inference_mode(cbn_calls):
    """Under torch.inference_mode a training and an eval forward run cbn's kernels and give what they give under
    no_grad: outputs, running statistics, num_batches_tracked."""
    bns = [ct.BatchNorm2d(3), ct.BatchNorm2d(3)]
    x = torch.randn(4, 3, 5, 5)
    for training in (True, False):
        for bn in bns:
            bn.train(training)
        with torch.no_grad():
            want = bns[0](x)
        with torch.inference_mode():
            got = bns[1](x)
        assert torch.equal(got, want), training
        for a, b in zip(bns[1].buffers(), bns[0].buffers()):
            assert torch.equal(a, b), training
    assert len(cbn_calls["batch_norm"]) == 4


def test_saved_tensors_go_through_torch(cbn_calls):
    """Under saved_tensors_hooks an eager call keeps its input only through torch's saved tensors: the hooks decide
    what the backward reads (what torch.utils.checkpoint and offloading rely on). A pack hook that copies the input
    makes the backward use the copy after the input's memory changed."""
    bns = [ct.BatchNorm2d(3), ct.BatchNorm2d(3)]
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    dy = torch.randn(4, 3, 5, 5)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        h = x * 2
        y = bns[0](h)
    with torch.no_grad():
        h.mul_(3)  # no version error: the saved tensor is the hook's copy
    (dx,) = torch.autograd.grad(y, x, dy)
    (want,) = torch.autograd.grad(bns[1](x * 2), x, dy)
    assert torch.equal(dx, want) and len(cbn_calls["batch_norm_backward"]) == 2


def test_traced_and_transformed_calls_see_the_ops(cbn_calls):
    """make_fx, a TorchDispatchMode and vmap see cbn's op (an eager call's NumPy work would be invisible to them or
    fail): make_fx's graph recomputes on another input, the mode logs the op, vmap gives the per-sample results."""
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils._python_dispatch import TorchDispatchMode

    stats = (torch.randn(3), torch.rand(3) + 0.5)
    weight, bias = torch.rand(3) + 0.5, torch.randn(3)

    def f(x):
        return ct.batch_norm(x, *stats, weight, bias, False)
    x = torch.randn(4, 3, 5, 5)
    gm = make_fx(f)(x)
    assert "cbn.batch_norm_eval" in gm.code
    close(gm(x * 3 + 1), f(x * 3 + 1), 1e-6, "make_fx graph")

    class Log(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))
    with Log() as log:
        f(x)
    assert "cbn.batch_norm_eval.default" in log.ops, log.ops
    xs = torch.randn(2, 4, 3, 5, 5)
    close(torch.vmap(f)(xs), torch.stack([f(xi) for xi in xs]), 1e-6, "vmap")


def test_weights_wrapped_by_torch_func_go_through_the_ops():
    """A weight that torch.func wraps (vmap over it) or left wrapped (a dead wrapper, escaped from a finished
    transform) takes the ops' path, not the eager one, and gives torch's results."""
    x = torch.randn(4, 3, 5, 5)
    weights = torch.rand(2, 3) + 0.5
    got = torch.func.vmap(lambda w: ct.batch_norm(x, None, None, w, None, True))(weights)
    want = torch.stack([torch.nn.functional.batch_norm(x, None, None, w, None, True) for w in weights])
    close(got, want, TOL[torch.float32]["y"], "vmap over the weight")
    escaped = {}

    def keep(w):
        escaped["w"] = w
        return w.sum()
    torch.func.grad(keep)(weights[0].clone().requires_grad_())
    dead = escaped["w"]
    assert torch._C._functorch.is_functorch_wrapped_tensor(dead)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ys = [ct.batch_norm(xs[0], None, None, dead, None, True),
          torch.nn.functional.batch_norm(xs[1], None, None, weights[0], None, True)]
    close(ys[0], ys[1], TOL[torch.float32]["y"], "dead wrapper")
    for y in ys:
        y.sum().backward()
    close(xs[0].grad, xs[1].grad, TOL[torch.float32]["grad"], "dead wrapper dx")


def test_running_statistics_that_require_grad_go_to_torch():
    """Running statistics that require grad: torch's batch norm runs (and raises its error in training)."""
    x = torch.randn(4, 3, 5, 5)
    stats = [torch.zeros(3, requires_grad=True), torch.ones(3, requires_grad=True)]
    with pytest.raises(RuntimeError) as want:
        torch.nn.functional.batch_norm(x, *stats, training=True)
    with pytest.raises(RuntimeError) as got:
        ct.batch_norm(x, *stats, training=True)
    assert str(got.value) == str(want.value)


def test_import_cbn_does_not_import_torch(run_python, tmp_path):
    res = run_python(["-c", "import sys, cbn; assert 'torch' not in sys.modules; import cbn.torch; "
                            "assert 'torch' in sys.modules"], tmp_path)
    assert res.returncode == 0, res.stderr


@pytest.mark.skipif(not EXAMPLE.is_file(), reason="this copy of tests/ came without examples/")
def test_example_quick_run(run_python, tmp_path):
    out = tmp_path / "table.txt"
    res = run_python([EXAMPLE, "--quick", "--out", out], tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = out.read_text().splitlines()
    assert rows[0].startswith("ResNet-18") and len(rows) == 7, rows
