#!/usr/bin/env python3
"""Runs one obim recipe split across Ray tasks: `obim run --part K/N` for
K = 1..N as N tasks (on as many machines as the cluster has, all sharing the
filesystem the recipe, its models, the outputs and the cache live on), then
`obim run --assemble` once they are all done.

    python3 examples/distributed/ray_parts.py RECIPE.obim --parts 4 [--obim PATH] [-- RUN-ARGS...]

Locally (`ray.init()` starts a one-machine cluster) this is the same as
running the parts in a loop; on a cluster, start it on the head node with
RAY_ADDRESS set (`ray.init()` then joins it). Arguments after `--` go to
every `obim run` (`--cache DIR`, `-o DIR`, `--force`, ...).
"""
import argparse
import os
import shutil
import subprocess
import sys

import ray


@ray.remote
def run_part(obim, recipe, k, n, extra):
    """One part: its shards of every output, into OUTPUT.obim-parts/."""
    done = subprocess.run(
        [obim, "run", recipe, "--part", f"{k}/{n}", *extra],
        capture_output=True,
        text=True,
    )
    return k, done.returncode, done.stderr


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recipe")
    p.add_argument("--parts", type=int, required=True)
    p.add_argument("--obim", default=shutil.which("obim") or "obim")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    a = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    a.extra = extra
    recipe = os.path.abspath(a.recipe)
    ray.init()
    results = ray.get([run_part.remote(a.obim, recipe, k, a.parts, a.extra) for k in range(1, a.parts + 1)])
    failed = [(k, err) for k, code, err in results if code != 0]
    for k, err in failed:
        print(f"part {k}/{a.parts} failed:\n{err}", file=sys.stderr)
    if failed:
        sys.exit(1)
    subprocess.run([a.obim, "run", recipe, "--assemble", *a.extra], check=True)


if __name__ == "__main__":
    main()
