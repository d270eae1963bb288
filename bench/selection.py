#!/usr/bin/env python3
"""The selection benchmark: choosing among 8 candidates that differ in a
scalar (task arithmetic's lambda; OBIM's scale, magnitude saliency, retain
0.3 each) with one `obim run` of an `auto` recipe, against 8 separate
`obim run` (one fixed value each) + `obim eval --loss` calls on the same
data. Prints a markdown table.

    python3 bench/selection.py [--skip-large] [--methods task_arithmetic,obim]

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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DATA = os.environ.get("OBIM_BENCH_DATA", os.path.join(HERE, "data"))
OBIM = os.path.join(ROOT, "target", "release", "obim")
VALUES = [0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0]
# Per method: the merge's head with the scalar in {}, each input's line, the
# scalar's name, and the merge's other lines.
METHODS = {
    "task_arithmetic": ("task_arithmetic(base: b, lambda: {})", "weight 1.0", "lambda", ""),
    "obim": ("obim(base: b, scale: {})", "retain 0.3", "scale", "    saliency magnitude\n"),
}
sys.path.insert(0, HERE)
from run import measure  # noqa: E402


def family(name, method, base, experts, work):
    os.makedirs(work, exist_ok=True)
    vals = []
    for task in ["add", "sort"]:
        path = os.path.join(work, f"{task}_val.jsonl")
        lines = open(os.path.join(ROOT, "examples", "demo", "data", task, "calib.jsonl")).read().splitlines()[:24]
        open(path, "w").write("\n".join(lines) + "\n")
        vals.append(path)
    head = f'base b = "{base}"\n' + "".join(f'model e{i} = "{e}"\n' for i, e in enumerate(experts))
    head += "".join(f'data v{i} = jsonl("{v}")\n' for i, v in enumerate(vals))
    merge_head, input_line, _, extra = METHODS[method]
    body = "".join(f"    e{i} {input_line}\n" for i in range(len(experts))) + extra

    def recipe(value, out, select):
        sel = "    select by loss(v0, v1)\n" if select else ""
        return f"{head}merge m = {merge_head.format(value)} {{\n{body}{sel}}}\noutput m -> \"{out}\"\n"

    cache = os.path.join(work, "cache")
    auto = os.path.join(work, "auto.obim")
    open(auto, "w").write(recipe("auto [" + ", ".join(map(str, VALUES)) + "]", os.path.join(work, "out-auto"), True))
    shutil.rmtree(cache, ignore_errors=True)
    a_wall, a_rss = measure([OBIM, "run", "--force", "--cache", cache, auto], f"{name} {method} auto")
    # The separate runs' walls, summed (not the span: `measure` first waits for an idle machine).
    s_wall = 0.0
    peak = 0
    for value in VALUES:
        r = os.path.join(work, f"fixed-{value}.obim")
        out = os.path.join(work, f"out-{value}")
        open(r, "w").write(recipe(value, out, False))
        wall, rss = measure([OBIM, "run", "--force", "--cache", cache, r], f"{name} {method} run {value}")
        s_wall += wall
        peak = max(peak, rss)
        wall, rss = measure([OBIM, "eval", out, "--loss", "--data", vals[0], "--data", vals[1]],
                            f"{name} {method} eval {value}")
        s_wall += wall
        peak = max(peak, rss)
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(os.path.join(work, "out-auto"), ignore_errors=True)
    print(f"| {name} | {METHODS[method][2]} | {a_wall:.1f} | {a_rss:.0f} | {s_wall:.1f} | {peak:.0f} | {a_wall / s_wall:.2f} |",
          flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--methods", default=",".join(METHODS))
    a = p.parse_args()
    methods = a.methods.split(",")
    subprocess.check_call(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT)
    print(f"\n{len(VALUES)} candidates ({VALUES}); {os.cpu_count()} cores\n")
    print("| family | candidates differ in | auto + select (s) | peak RSS (MiB) | 8 × (run + eval --loss) (s) | peak RSS (MiB) | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |", flush=True)
    demo = os.path.join(ROOT, "examples", "demo")
    for method in methods:
        family("demo (425k params)", method, os.path.join(demo, "base"),
               [os.path.join(demo, e) for e in ["expert_add", "expert_reverse", "expert_sort"]],
               os.path.join(DATA, "select-demo"))
    if not a.skip_large:
        base = os.path.join(DATA, "base")
        if not os.path.exists(os.path.join(base, "config.json")):
            raise SystemExit(f"{base} is missing: run bench/run.py first")
        for d in ["base", "expert_a", "expert_b", "expert_c"]:
            shutil.copy(os.path.join(demo, "base", "tokenizer.json"), os.path.join(DATA, d))
        for method in methods:
            family("bench family (814M params)", method, base,
                   [os.path.join(DATA, e) for e in ["expert_a", "expert_b", "expert_c"]],
                   os.path.join(DATA, "select-large"))


if __name__ == "__main__":
    main()
