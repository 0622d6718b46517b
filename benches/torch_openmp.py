"""Two OpenMP runtimes in one process: a training step of conv -> BN -> ReLU layers with torch's BatchNorm2d and
with cbn.torch's, when cbn's kernels share torch's OpenMP runtime and when they bring their own.

A source build of cbn on Linux links libgomp.so.1, the soname of the libgomp that torch's wheel ships: the loader
maps one runtime for both. The release wheels vendor libgomp under a hashed name (auditwheel), so beside torch the
process holds two: each keeps its own worker threads, which spin for a while after their parallel region
(GOMP_SPINCOUNT, OMP_WAIT_POLICY) while the other runtime's threads want the same cores. This script makes such a
copy of the installed cbn (patchelf, as auditwheel does), runs each configuration in a fresh process, rounds in
alternation, and prints the median wall and CPU milliseconds per step.

Usage: ``python benches/torch_openmp.py [--rounds 3] [--steps 20] [--threads 2] [--out FILE]`` (needs patchelf).
"""
import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, sys, time, copy, torch
mode, threads, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
torch.manual_seed(0)
layers = []
for _ in range(4):
    layers += [torch.nn.Conv2d(64, 64, 3, padding=1, bias=False), torch.nn.BatchNorm2d(64), torch.nn.ReLU()]
models = {"torch": torch.nn.Sequential(*layers)}
if mode == "mixed":
    import cbn.torch
    models["cbn"] = cbn.torch.convert(copy.deepcopy(models["torch"]))
x = torch.randn(8, 64, 28, 28)
step = {name: (lambda m=m: m(x).sum().backward()) for name, m in models.items()}
for f in step.values():
    f(); f()
wall, cpu = ({name: [] for name in models} for _ in range(2))
for _ in range(steps):
    for name, f in step.items():
        w, c = time.perf_counter(), time.process_time()
        f()
        wall[name].append(time.perf_counter() - w)
        cpu[name].append(time.process_time() - c)
print(json.dumps({name: [wall[name], cpu[name]] for name in models}))
"""

# (label, environment changes)
POLICIES = [("default", {}), ("OMP_WAIT_POLICY=PASSIVE", {"OMP_WAIT_POLICY": "PASSIVE"}),
            ("GOMP_SPINCOUNT=10000", {"GOMP_SPINCOUNT": "10000"})]


def separate_runtime_copy(folder):
    """A copy of the installed cbn package under ``folder`` whose kernels load their own libgomp (renamed, as
    auditwheel vendors it); returns the folder to put first on PYTHONPATH."""
    import cbn
    pkg = os.path.dirname(cbn.__file__)
    shutil.copytree(pkg, os.path.join(folder, "cbn"), ignore=shutil.ignore_patterns("__pycache__"))
    libs = os.path.join(folder, "cbn.libs")
    os.makedirs(libs)
    found = subprocess.run(["ldd", glob.glob(os.path.join(pkg, "_kernels*.so"))[0]], capture_output=True, text=True)
    gomp = next(line.split("=>")[1].split()[0] for line in found.stdout.splitlines() if "libgomp" in line)
    shutil.copy(gomp, os.path.join(libs, "libgomp-cbn.so.1"))
    subprocess.run(["patchelf", "--set-soname", "libgomp-cbn.so.1", os.path.join(libs, "libgomp-cbn.so.1")],
                   check=True)
    for so in glob.glob(os.path.join(folder, "cbn", "*.so")):
        subprocess.run(["patchelf", "--replace-needed", "libgomp.so.1", "libgomp-cbn.so.1", "--set-rpath",
                        "$ORIGIN/../cbn.libs", so], check=True)
    return folder


def run(mode, path, env_changes, threads, steps):
    """One child process: {model: (wall seconds per step, CPU seconds per step)}."""
    env = dict(os.environ, **env_changes)
    if path:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, env.get("PYTHONPATH", "")) if p)
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(threads), str(steps)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        runtimes = [("one runtime (source build)", None), ("two runtimes (wheel-like)", separate_runtime_copy(tmp))]
        configs = [(rt, path, pol, env, mode) for rt, path in runtimes for pol, env in POLICIES
                   for mode in ("alone", "mixed") if not (mode == "alone" and path)]
        samples = {c[::2]: {} for c in configs}
        for _ in range(args.rounds):
            for rt, path, pol, env, mode in configs:
                for model, (wall, cpu) in run(mode, path, env, args.threads, args.steps).items():
                    samples[rt, pol, mode].setdefault(model, ([], []))
                    samples[rt, pol, mode][model][0].extend(wall)
                    samples[rt, pol, mode][model][1].extend(cpu)
    lines = [f"conv(64->64, 3x3) -> BN -> ReLU x 4, input (8, 64, 28, 28) float32, forward + backward, "
             f"{args.threads} threads; medians of {args.rounds} processes x {args.steps} steps, ms per step",
             f"{'runtimes':>27} {'policy':>24} {'process':>6} {'BN':>6} | {'wall':>7} {'CPU':>7}"]
    for (rt, pol, mode), by_model in samples.items():
        for model, (wall, cpu) in by_model.items():
            lines.append(f"{rt if mode == 'mixed' else 'torch only':>27} {pol:>24} {mode:>6} {model:>6} | "
                         f"{1e3 * statistics.median(wall):7.2f} {1e3 * statistics.median(cpu):7.2f}")
    print("\n".join(lines))
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
