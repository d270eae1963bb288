#!/usr/bin/env python3
"""The merge benchmark: obim against mergekit 0.1.5 on the same files, plus
the I/O floor. Prints a markdown table (wall time, peak RSS, obim/mergekit).

    python3 bench/run.py            # makes bench/.venv (mergekit 0.1.5) and bench/data, then measures

Every input is read once untimed, so all runs start with the files in the
page cache; each measurement is the median wall time of OBIM_BENCH_REPEAT
runs (default 3) and their largest peak RSS.

Methods: task_arithmetic, ties (density 0.5), linear, and obim (magnitude,
3 experts, obim only). Both tools compute in float32 and write bfloat16.
The floor reads every input byte once and writes an output of the same
size with obim's writeback strategy (no arithmetic). Each tool writes into
a fresh directory: removing an earlier output is not timed.
"""
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("OBIM_BENCH_VENV", os.path.join(HERE, ".venv"))
DATA = os.environ.get("OBIM_BENCH_DATA", os.path.join(HERE, "data"))
OBIM = os.path.join(ROOT, "target", "release", "obim")
EXPERTS = ["expert_a", "expert_b", "expert_c"]
REPEAT = int(os.environ.get("OBIM_BENCH_REPEAT", "3"))


def sh(cmd, **kw):
    subprocess.check_call(cmd, **kw)


def measure(cmd):
    """Wall seconds and peak RSS (MiB) of one command."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.read().decode()}")
    return wall, usage.ru_maxrss / 1024


def setup():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", VENV])
        sh([py, "-m", "pip", "install", "-q", "mergekit==0.1.5"])
    if not os.path.exists(os.path.join(DATA, "expert_c", "config.json")):
        sh([py, os.path.join(HERE, "make_family.py"), DATA] + sys.argv[1:])
    sh(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT)
    return py


def mergekit_config(method):
    models = []
    for e in EXPERTS:
        params = {"weight": 1.0}
        if method == "ties":
            params["density"] = 0.5
        models.append({"model": os.path.join(DATA, e), "parameters": params})
    cfg = {"merge_method": method, "dtype": "float32", "out_dtype": "bfloat16", "models": models}
    if method != "linear":
        cfg["base_model"] = os.path.join(DATA, "base")
    return cfg


def obim_recipe(method):
    lines = [f'model {e} = "./{e}"' for e in EXPERTS]
    if method == "linear":
        head = "merge m = linear {"
        body = [f"    {e} weight 1.0" for e in EXPERTS]
    elif method == "obim":
        lines.insert(0, 'base base = "./base"')
        head = "merge m = obim(base: base) {"
        body = [f"    {e} retain 0.3" for e in EXPERTS] + ["    saliency magnitude"]
    else:
        lines.insert(0, 'base base = "./base"')
        extra = ", density: 0.5" if method == "ties" else ""
        head = f"merge m = {method}(base: base{extra}) {{"
        body = [f"    {e} weight 1.0" for e in EXPERTS]
    return "\n".join(lines + ["", head] + body + ["}", "", f'output m -> "out/obim-{method}" {{ dtype bf16 }}', ""])


def floor(out):
    """Reads every input byte once (into a small reused buffer) and writes an
    output of the base's size, with the same writeback strategy as obim:
    the kernel is told to start writing every 32 MiB, then one fsync."""
    libc = ctypes.CDLL(None, use_errno=True)
    def start_writeback(fd, start, length):
        if hasattr(libc, "sync_file_range"):
            libc.sync_file_range(fd, ctypes.c_int64(start), ctypes.c_int64(length), ctypes.c_uint(2))  # SYNC_FILE_RANGE_WRITE
    def run():
        buf = bytearray(1 << 20)
        for m in ["base"] + EXPERTS:
            d = os.path.join(DATA, m)
            for f in sorted(os.listdir(d)):
                if f.endswith(".safetensors"):
                    with open(os.path.join(d, f), "rb", buffering=0) as fh:
                        while fh.readinto(buf):
                            pass
        size = sum(os.path.getsize(os.path.join(DATA, "base", f)) for f in os.listdir(os.path.join(DATA, "base")) if f.endswith(".safetensors"))
        block = bytes(32 << 20)
        with open(out, "wb", buffering=0) as fh:
            written = 0
            while written < size:
                n = fh.write(block[: min(len(block), size - written)])
                start_writeback(fh.fileno(), written, n)
                written += n
            os.fsync(fh.fileno())
        os.remove(out)
    start = time.monotonic()
    run()
    return time.monotonic() - start


def median(runs):
    """The median wall time of repeated runs, and their largest peak RSS."""
    walls = sorted(w for w, _ in runs)
    rss = [r for _, r in runs if r is not None]
    return walls[len(walls) // 2], max(rss) if rss else None


def main():
    py = setup()
    mergekit = os.path.join(VENV, "bin", "mergekit-yaml")
    out = os.path.join(DATA, "out")
    os.makedirs(out, exist_ok=True)
    # Every input into the page cache first, untimed: all runs start warm.
    floor(os.path.join(out, "floor.bin"))
    rows = []
    fl, _ = median([(floor(os.path.join(out, "floor.bin")), None) for _ in range(REPEAT)])
    rows.append(("floor (read inputs, write output)", fl, None, None, None))
    for method in ["task_arithmetic", "ties", "linear", "obim"]:
        recipe = os.path.join(DATA, f"{method}.obim")
        open(recipe, "w").write(obim_recipe(method))
        def obim_run():
            # Like mergekit's below, obim writes into a fresh place: removing
            # a previous output is not part of the measured time.
            shutil.rmtree(os.path.join(out, f"obim-{method}"), ignore_errors=True)
            return measure([OBIM, "run", recipe])
        o_wall, o_rss = median([obim_run() for _ in range(REPEAT)])
        m_wall = m_rss = None
        if method != "obim":
            cfg = os.path.join(DATA, f"{method}.yml")
            json.dump(mergekit_config(method), open(cfg, "w"))
            target = os.path.join(out, f"mergekit-{method}")
            def mergekit_run():
                shutil.rmtree(target, ignore_errors=True)
                return measure([mergekit, cfg, target, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"])
            m_wall, m_rss = median([mergekit_run() for _ in range(REPEAT)])
        rows.append((method, o_wall, o_rss, m_wall, m_rss))
    print(f"\n{sum(1 for _ in EXPERTS)} experts + base; median of {REPEAT} runs each; {subprocess.check_output([OBIM, '--version']).decode().strip()}, mergekit 0.1.5; {os.cpu_count()} cores\n")
    print("| method | obim wall (s) | obim peak RSS (MiB) | mergekit wall (s) | mergekit peak RSS (MiB) | obim / mergekit | obim / floor |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, ow, orss, mw, mrss in rows:
        f = lambda x, d=1: "—" if x is None else f"{x:.{d}f}"
        ratio = "—" if mw is None or orss is None else f"{ow / mw:.2f}"
        vs_floor = "—" if orss is None else f"{ow / fl:.2f}"
        print(f"| {name} | {f(ow)} | {f(orss, 0)} | {f(mw)} | {f(mrss, 0)} | {ratio} | {vs_floor} |")


if __name__ == "__main__":
    main()
