"""The performance targets of the benchmark suite (float32 rows): which rows of a ``cbn-bench`` JSON miss them.

    cbn-bench --threads 1,2 --json results.json
    python benches/targets.py results.json

Prints one line per missed target (and how many), for the project's performance work; ``cbn-bench`` itself reports
only what it measured. Targets: the training forward within 2x a copy (1.4x beyond 50 MB), the backward within 2x an
add (1.4x beyond 50 MB, NCHW), eval within 1.2x a copy (1.05x beyond 50 MB, NCHW), with ``out=`` nothing allocated
beyond 64 KB or 5% of the input, faster than PyTorch (train 2x, 1.5x for (N, C); backward 1.5x; eval 1x) from 1 MB,
forward+backward 10x faster than the NumPy reference, and a (2, 8, 4, 4) training call within 10 us.
"""
import argparse
import json
import sys


def target_misses(rows):
    """Lines naming each row that misses one of the performance targets of the benchmark suite (float32 only)."""
    misses = []
    by_case = {}
    for r in rows:
        by_case.setdefault((tuple(r["shape"]), r["layout"], r["dtype"], r["threads"]), {})[r["op"]] = r
    for (shape, layout, dtype, threads), ops in by_case.items():
        if dtype != "float32":
            continue
        big, sized = ops["train"]["MB"] >= 50, ops["train"]["MB"] >= 1
        # channels-last and NLC: backward <= 2x an add and eval <= 1.2x a copy at every size
        nchw = layout == "NCHW"
        limits = {"train": 1.4 if big else 2.0, "backward": 1.4 if big and nchw else 2.0,
                  "eval": 1.05 if big and nchw else 1.2}
        name = f"{shape} {layout} {dtype} {threads} thr"
        for op, limit in limits.items():
            if sized and ops[op]["cbn_over_roofline"] > limit:
                misses.append(f"{name}: {op} {ops[op]['cbn_over_roofline']:.2f}x roofline > {limit}")
            if ops[op]["alloc_bytes_out"] > max(64e3, 0.05 * ops[op]["MB"] * 1e6):
                misses.append(f"{name}: {op} with out= allocates {ops[op]['alloc_bytes_out'] / 1e3:.0f} KB")
        faster = (("train", 2.0 if len(shape) > 2 else 1.5), ("backward", 1.5), ("eval", 1.0))
        for op, limit in faster if sized else ():
            if ops[op]["torch_over_cbn"] is not None and ops[op]["torch_over_cbn"] < limit:
                misses.append(f"{name}: {op} only {ops[op]['torch_over_cbn']:.2f}x as fast as PyTorch < {limit}")
        if ops["train"]["numpy_us"] is not None:
            speedup = ((ops["train"]["numpy_us"] + ops["backward"]["numpy_us"])
                       / (ops["train"]["cbn_us"] + ops["backward"]["cbn_us"]))
            if speedup < 10:
                misses.append(f"{name}: forward+backward only {speedup:.1f}x faster than the NumPy reference < 10")
        if shape == (2, 8, 4, 4) and ops["train"]["cbn_us"] > 10:
            misses.append(f"{name}: train call {ops['train']['cbn_us']:.1f} us > 10 us")
    return misses


def main(argv=None):
    """Command line: read a ``cbn-bench --json`` file, print the missed targets; exit status 1 when any is missed."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", help="a file written by cbn-bench --json")
    a = p.parse_args(argv)
    with open(a.json) as f:
        misses = target_misses(json.load(f)["rows"])
    print(f"targets (float32): {len(misses)} missed" + "".join(f"\n  {m}" for m in misses))
    return 1 if misses else 0


if __name__ == "__main__":
    sys.exit(main())
