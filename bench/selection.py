#!/usr/bin/env python3
"""The selection benchmark: choosing among 8 candidates (task arithmetic's
lambda) with one `obim run` of an `auto` recipe, against 8 separate
`obim run` (one fixed lambda each) + `obim eval --loss` calls on the same
data. Prints a markdown table per family.

    python3 bench/selection.py [--skip-large]

Families: examples/demo (425k parameters, 3 experts), and the merge
benchmark's 814M-parameter family (bench/data, made by bench/run.py; the
demo's character tokenizer is copied in) with 3 experts. Selection data:
two jsonl files of the demo's calibration texts (24 each).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.environ.get("OBIM_BENCH_DATA", os.path.join(HERE, "data"))
OBIM = os.path.join(ROOT, "target", "release", "obim")
LAMBDAS = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
sys.path.insert(0, HERE)
from run import measure  # noqa: E402


def family(name, base, experts, work):
    os.makedirs(work, exist_ok=True)
    vals = []
    for task in ["add", "sort"]:
        path = os.path.join(work, f"{task}_val.jsonl")
        lines = open(os.path.join(ROOT, "examples", "demo", "data", task, "calib.jsonl")).read().splitlines()[:24]
        open(path, "w").write("\n".join(lines) + "\n")
        vals.append(path)
    head = f'base b = "{base}"\n' + "".join(f'model e{i} = "{e}"\n' for i, e in enumerate(experts))
    head += "".join(f'data v{i} = jsonl("{v}")\n' for i, v in enumerate(vals))
    weights = "".join(f"    e{i} weight 1.0\n" for i in range(len(experts)))

    def recipe(lam, out, select):
        sel = "    select by loss(v0, v1)\n" if select else ""
        return f"{head}merge m = task_arithmetic(base: b, lambda: {lam}) {{\n{weights}{sel}}}\noutput m -> \"{out}\"\n"

    cache = os.path.join(work, "cache")
    auto = os.path.join(work, "auto.obim")
    open(auto, "w").write(recipe("auto [" + ", ".join(map(str, LAMBDAS)) + "]", os.path.join(work, "out-auto"), True))
    shutil.rmtree(cache, ignore_errors=True)
    a_wall, a_rss = measure([OBIM, "run", "--force", "--cache", cache, auto])
    start = time.monotonic()
    peak = 0
    for lam in LAMBDAS:
        r = os.path.join(work, f"fixed-{lam}.obim")
        out = os.path.join(work, f"out-{lam}")
        open(r, "w").write(recipe(lam, out, False))
        _, rss = measure([OBIM, "run", "--force", "--cache", cache, r])
        peak = max(peak, rss)
        _, rss = measure([OBIM, "eval", out, "--loss", "--data", vals[0], "--data", vals[1]])
        peak = max(peak, rss)
        shutil.rmtree(out, ignore_errors=True)
    s_wall = time.monotonic() - start
    shutil.rmtree(os.path.join(work, "out-auto"), ignore_errors=True)
    print(f"| {name} | {a_wall:.1f} | {a_rss:.0f} | {s_wall:.1f} | {peak:.0f} | {a_wall / s_wall:.2f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip-large", action="store_true")
    a = p.parse_args()
    subprocess.check_call(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT)
    print(f"\n{len(LAMBDAS)} candidates (task arithmetic, lambda {LAMBDAS}); {os.cpu_count()} cores\n")
    print("| family | auto + select (s) | peak RSS (MiB) | 8 × (run + eval --loss) (s) | peak RSS (MiB) | ratio |")
    print("| --- | --- | --- | --- | --- | --- |")
    demo = os.path.join(ROOT, "examples", "demo")
    family("demo (425k params)", os.path.join(demo, "base"),
           [os.path.join(demo, e) for e in ["expert_add", "expert_reverse", "expert_sort"]],
           os.path.join(DATA, "select-demo"))
    if not a.skip_large:
        base = os.path.join(DATA, "base")
        if not os.path.exists(os.path.join(base, "config.json")):
            raise SystemExit(f"{base} is missing: run bench/run.py first")
        for d in ["base", "expert_a", "expert_b", "expert_c"]:
            shutil.copy(os.path.join(demo, "base", "tokenizer.json"), os.path.join(DATA, d))
        family("bench family (814M params)", base,
               [os.path.join(DATA, e) for e in ["expert_a", "expert_b", "expert_c"]],
               os.path.join(DATA, "select-large"))


if __name__ == "__main__":
    main()
