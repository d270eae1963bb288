#!/usr/bin/env python3
"""The merge benchmark: obim against mergekit 0.1.5 on the same files, plus
the I/O floor. Prints a markdown table (wall time, peak RSS, obim/mergekit,
obim/floor).

    python3 bench/run.py                 # every method (makes bench/.venv and bench/data first)
    python3 bench/run.py ties karcher    # only the methods named (and the floors they need)
    python3 bench/run.py floor           # only the floor
    python3 bench/run.py --list          # the method names

Every input is read once untimed before each method, so all runs start with
the files in the page cache; each measurement is the median wall time of
OBIM_BENCH_REPEAT runs (default 3) and their largest peak RSS.

Before every timed run the benchmark waits until the 1-minute load average
is below OBIM_BENCH_LOAD (default 0.8), polling every 5 s, for at most 10
minutes (then it measures anyway and says so); the load at the start of each
timed run goes to DATA/bench.log.

Both tools compute in float32 and write bfloat16. The floor reads every
input byte once and writes an output of the base's size the way obim
writes (O_DIRECT where the file system allows; no arithmetic); it is
measured for each set of inputs a method reads (base + 3 experts for
most), and obim / floor divides by the floor of the method's own inputs.
Each tool writes into a fresh directory: removing an earlier output is not
timed; outputs are deleted after each method (18 methods x 2 tools x 1.6 GB
would not fit).

Environment: OBIM_BENCH_VENV (a venv with mergekit 0.1.5; default
bench/.venv, made with pip), OBIM_BENCH_DATA (the family; default
bench/data, made by make_family.py), OBIM_BENCH_FAMILY_ARGS (extra
make_family.py arguments when it is made), OBIM_BENCH_OBIM (a prebuilt obim
binary: no cargo build), OBIM_BENCH_REPEAT, OBIM_BENCH_MERGEKIT_REPEAT
(mergekit's runs; default OBIM_BENCH_REPEAT), OBIM_BENCH_LOAD,
OBIM_BENCH_MERGEKIT=0 (obim and the floor only: a quick check while
working; the README's table always has both tools).
"""
import ctypes
import datetime
import json
import mmap
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("OBIM_BENCH_VENV", os.path.join(HERE, ".venv"))
DATA = os.environ.get("OBIM_BENCH_DATA", os.path.join(HERE, "data"))
# A prebuilt obim (e.g. built from a clean checkout while the working tree is
# being edited); without it the benchmark builds target/release/obim itself.
OBIM = os.environ.get("OBIM_BENCH_OBIM") or os.path.join(ROOT, "target", "release", "obim")
EXPERTS = ["expert_a", "expert_b", "expert_c"]
REPEAT = int(os.environ.get("OBIM_BENCH_REPEAT", "3"))
# mergekit takes minutes a method: the README's one run of both tools has it
# once and obim and the floors REPEAT times.
MERGEKIT_REPEAT = int(os.environ.get("OBIM_BENCH_MERGEKIT_REPEAT", str(REPEAT)))
WITH_MERGEKIT = os.environ.get("OBIM_BENCH_MERGEKIT", "1") != "0"
LOAD_LIMIT = float(os.environ.get("OBIM_BENCH_LOAD", "0.8"))
LOAD_POLL_S = 5
LOAD_GIVE_UP_S = 600
LOG = os.path.join(DATA, "bench.log")
WARNINGS = []


def method(label, *, experts=3, base=True, mk_params=None, mk_model=None, obim_head, obim_input="", obim_extra=(),
           mergekit=True):
    """One benchmark row: the same merge as a mergekit config and an obim recipe.
    mk_params: mergekit's merge-level `parameters`; mk_model: each model's
    `parameters`; obim_head: what follows `merge m = `; obim_input: what
    follows each input's name in the recipe."""
    return dict(label=label, experts=EXPERTS[:experts], base=base, mk_params=mk_params or {}, mk_model=mk_model or {},
                obim_head=obim_head, obim_input=obim_input, obim_extra=list(obim_extra), mergekit=mergekit)


W1 = {"weight": 1.0}
METHODS = {
    "task_arithmetic": method("task_arithmetic", mk_model=W1, obim_head="task_arithmetic(base: base)",
                              obim_input="weight 1.0"),
    "ties": method("ties (density 0.5)", mk_model={"weight": 1.0, "density": 0.5},
                   obim_head="ties(base: base, density: 0.5)", obim_input="weight 1.0"),
    "linear": method("linear", base=False, mk_model=W1, obim_head="linear", obim_input="weight 1.0"),
    "obim": method("obim (magnitude, retain 0.3 × 3)", obim_head="obim(base: base)", obim_input="retain 0.3",
                   obim_extra=["saliency magnitude"], mergekit=False),
    "breadcrumbs": method("breadcrumbs (density 0.9, gamma 0.01)", mk_model={"weight": 1.0, "density": 0.9, "gamma": 0.01},
                          obim_head="breadcrumbs(base: base, density: 0.9, gamma: 0.01)", obim_input="weight 1.0"),
    "breadcrumbs_ties": method("breadcrumbs_ties (density 0.9, gamma 0.01)",
                               mk_model={"weight": 1.0, "density": 0.9, "gamma": 0.01},
                               obim_head="breadcrumbs_ties(base: base, density: 0.9, gamma: 0.01)", obim_input="weight 1.0"),
    "della": method("della (density 0.5, epsilon 0.1)", mk_model={"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                    obim_head="della(base: base, density: 0.5, epsilon: 0.1)", obim_input="weight 1.0"),
    "della_linear": method("della_linear (density 0.5, epsilon 0.1)",
                           mk_model={"weight": 1.0, "density": 0.5, "epsilon": 0.1},
                           obim_head="della_linear(base: base, density: 0.5, epsilon: 0.1)", obim_input="weight 1.0"),
    "model_stock": method("model_stock", obim_head="model_stock(base: base)"),
    "nuslerp": method("nuslerp (2 experts, with base)", experts=2, mk_model={"weight": 0.5},
                      obim_head="nuslerp(base: base)", obim_input="weight 0.5"),
    "multislerp": method("multislerp (with base)", mk_model=W1, obim_head="multislerp(base: base)",
                         obim_input="weight 1.0"),
    "karcher": method("karcher (no base)", base=False, obim_head="karcher"),
    "sce": method("sce (select_topk 0.5)", mk_params={"select_topk": 0.5}, obim_head="sce(base: base, select_topk: 0.5)"),
    "arcee_fusion": method("arcee_fusion (1 expert)", experts=1, obim_head="arcee_fusion(base: base)"),
    "nearswap": method("nearswap (1 expert, t 0.0001)", experts=1, mk_params={"t": 0.0001},
                       obim_head="nearswap(base: base, t: 0.0001)"),
    "passthrough": method("passthrough (1 model, scale 0.5)", experts=1, base=False, mk_params={"scale": 0.5},
                          obim_head="passthrough(scale: 0.5)"),
    "ram": method("ram", obim_head="ram(base: base)"),
    "ramplus_tl": method("ramplus_tl", obim_head="ramplus_tl(base: base)"),
}


def sh(cmd, **kw):
    subprocess.check_call(cmd, **kw)


def log(msg):
    line = f"{datetime.datetime.now().isoformat(timespec='seconds')} {msg}"
    print(line, flush=True)
    with open(LOG, "a") as f:
        f.write(line + "\n")


def load1():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])


def quiet(what):
    """Waits until the 1-minute load average is below LOAD_LIMIT (at most
    LOAD_GIVE_UP_S), then logs the load at the start of the timed run."""
    start = time.monotonic()
    load = load1()
    while load >= LOAD_LIMIT and time.monotonic() - start < LOAD_GIVE_UP_S:
        time.sleep(LOAD_POLL_S)
        load = load1()
    waited = time.monotonic() - start
    if load >= LOAD_LIMIT:
        msg = f"WARNING: load {load:.2f} still >= {LOAD_LIMIT} after {waited:.0f} s of waiting; measuring {what} anyway"
        WARNINGS.append(msg)
        log(msg)
    log(f"start {what}: load {load:.2f} (waited {waited:.0f} s)")


def measure(cmd, what):
    """Wall seconds, peak RSS (MiB) and user and system CPU seconds of one
    command."""
    quiet(what)
    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
        if status != 0:
            err.seek(0)
            raise RuntimeError(f"failed: {' '.join(cmd)}\n{err.read().decode(errors='replace')[-4000:]}")
    log(f"  {what}: {wall:.2f} s, {usage.ru_maxrss / 1024:.0f} MiB, user {usage.ru_utime:.2f} s, "
        f"system {usage.ru_stime:.2f} s")
    return wall, usage.ru_maxrss / 1024, usage.ru_utime, usage.ru_stime


def setup():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        sh([sys.executable, "-m", "venv", VENV])
        sh([py, "-m", "pip", "install", "-q", "mergekit==0.1.5"])
    if not os.path.exists(os.path.join(DATA, "expert_c", "config.json")):
        extra = shlex.split(os.environ.get("OBIM_BENCH_FAMILY_ARGS", ""))
        sh([py, os.path.join(HERE, "make_family.py"), DATA] + extra)
    if not os.environ.get("OBIM_BENCH_OBIM"):
        sh(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT)
    return py


def inputs(m):
    """The models a method reads, base first."""
    return (["base"] if m["base"] else []) + m["experts"]


def mergekit_config(m):
    models = []
    for e in m["experts"]:
        entry = {"model": os.path.join(DATA, e)}
        if m["mk_model"]:
            entry["parameters"] = dict(m["mk_model"])
        models.append(entry)
    cfg = {"merge_method": m["name"], "dtype": "float32", "out_dtype": "bfloat16", "models": models}
    if m["base"]:
        cfg["base_model"] = os.path.join(DATA, "base")
    if m["mk_params"]:
        cfg["parameters"] = dict(m["mk_params"])
    return cfg


def obim_recipe(m):
    lines = (['base base = "./base"'] if m["base"] else []) + [f'model {e} = "./{e}"' for e in m["experts"]]
    body = [f"    {e} {m['obim_input']}".rstrip() for e in m["experts"]] + [f"    {x}" for x in m["obim_extra"]]
    return "\n".join(lines + ["", f"merge m = {m['obim_head']} {{"] + body + ["}", "",
                     f'output m -> "out/obim-{m["name"]}" {{ dtype bf16 }}', ""])


def shard_files(model):
    d = os.path.join(DATA, model)
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def read_all(models):
    buf = bytearray(1 << 20)
    for model in models:
        for path in shard_files(model):
            with open(path, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass


def floor(models, out):
    """Reads every byte of the models' shards once (into a small reused
    buffer) and writes an output the size of the first model's shards the
    way obim writes: O_DIRECT from an aligned buffer, 8 MiB a write, the
    last block padded and the file cut back, then one fsync (where the file
    system refuses O_DIRECT, through the page cache with the kernel told to
    start writing every 32 MiB, as obim then does)."""
    start = time.monotonic()
    read_all(models)
    size = sum(os.path.getsize(p) for p in shard_files(models[0]))
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o644)
    except (OSError, AttributeError):
        fd = None
    if fd is not None:
        block = mmap.mmap(-1, 8 << 20)  # page-aligned, zeros
        written = 0
        while written < size:
            n = min(len(block), size - written)
            os.write(fd, memoryview(block)[: -(-n // 4096) * 4096])
            written += n
        os.ftruncate(fd, size)
        os.fsync(fd)
        os.close(fd)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        block = bytes(32 << 20)
        with open(out, "wb", buffering=0) as fh:
            written = 0
            while written < size:
                n = fh.write(block[: min(len(block), size - written)])
                if hasattr(libc, "sync_file_range"):  # SYNC_FILE_RANGE_WRITE
                    libc.sync_file_range(fh.fileno(), ctypes.c_int64(written), ctypes.c_int64(n), ctypes.c_uint(2))
                written += n
            os.fsync(fh.fileno())
    wall = time.monotonic() - start
    os.remove(out)  # not timed
    return wall


def median(runs):
    """The median wall time of repeated runs, their largest peak RSS, and
    their median user and system CPU seconds."""
    def mid(xs):
        return sorted(xs)[len(xs) // 2]
    rss = [r for _, r, _, _ in runs if r is not None]
    return mid([w for w, _, _, _ in runs]), max(rss) if rss else None, mid([u for _, _, u, _ in runs]), \
        mid([s for _, _, _, s in runs])


def floor_label(models):
    if models == ["base"] + EXPERTS:
        return "floor (read inputs, write output)"
    n = sum(1 for x in models if x != "base")
    what = ("base + " if "base" in models else "") + f"{n} expert{'s' if n > 1 else ''}"
    return f"floor ({what})"


def main():
    args = sys.argv[1:]
    if args[:1] == ["--list"]:
        print("\n".join(METHODS))
        return
    # `floor` alone measures only the floor; no names: every method.
    names = [a for a in args if a != "floor"] if args else list(METHODS)
    unknown = [a for a in names if a not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s): {', '.join(unknown)}; known: floor, {', '.join(METHODS)}")
    for n, m in METHODS.items():
        m["name"] = n
    py = setup()
    del py
    mergekit = os.path.join(VENV, "bin", "mergekit-yaml")
    out = os.path.join(DATA, "out")
    os.makedirs(out, exist_ok=True)
    log(f"bench: {' '.join(names)}; REPEAT={REPEAT}; MERGEKIT_REPEAT={MERGEKIT_REPEAT}; load limit {LOAD_LIMIT}")

    floors = {}  # tuple of models -> median wall
    task_arithmetic = None  # obim's, for obim / task arithmetic
    rows = []
    failures = []
    wanted_floors = [("base", *EXPERTS)] + [tuple(inputs(METHODS[n])) for n in names]
    for models in dict.fromkeys(wanted_floors):
        read_all(models)  # into the page cache, untimed
        runs = []
        for i in range(REPEAT):
            quiet(f"{floor_label(list(models))} #{i + 1}")
            runs.append((floor(list(models), os.path.join(out, "floor.bin")), None, 0.0, 0.0))
            log(f"  floor: {runs[-1][0]:.2f} s")
        floors[models], _, _, _ = median(runs)
        rows.append((floor_label(list(models)), floors[models], None, None, None, None, None))

    for name in names:
        m = METHODS[name]
        read_all(inputs(m))  # into the page cache, untimed
        recipe = os.path.join(DATA, f"{name}.obim")
        with open(recipe, "w") as f:
            f.write(obim_recipe(m))
        o_dir = os.path.join(out, f"obim-{name}")
        m_dir = os.path.join(out, f"mergekit-{name}")
        o_wall = o_rss = o_cpu = m_wall = m_rss = None
        try:
            runs = []
            for i in range(REPEAT):
                # Like mergekit's below, obim writes into a fresh place: removing
                # a previous output is not part of the measured time.
                shutil.rmtree(o_dir, ignore_errors=True)
                runs.append(measure([OBIM, "run", recipe], f"obim {name} #{i + 1}"))
            o_wall, o_rss, user, system = median(runs)
            o_cpu = (user, system)
        except RuntimeError as e:
            failures.append(f"obim {name}: {e}")
            log(f"FAILED obim {name}: {e}")
        shutil.rmtree(o_dir, ignore_errors=True)
        if m["mergekit"] and WITH_MERGEKIT:
            cfg = os.path.join(DATA, f"{name}.yml")
            with open(cfg, "w") as f:
                json.dump(mergekit_config(m), f)
            try:
                runs = []
                for i in range(MERGEKIT_REPEAT):
                    shutil.rmtree(m_dir, ignore_errors=True)
                    runs.append(measure([mergekit, cfg, m_dir, "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                                        f"mergekit {name} #{i + 1}"))
                m_wall, m_rss, _, _ = median(runs)
            except RuntimeError as e:
                failures.append(f"mergekit {name}: {e}")
                log(f"FAILED mergekit {name}: {e}")
            shutil.rmtree(m_dir, ignore_errors=True)
        rows.append((m["label"], o_wall, o_rss, o_cpu, m_wall, m_rss, floors[tuple(inputs(m))]))
        if name == "task_arithmetic":
            task_arithmetic = o_wall

    version = subprocess.check_output([OBIM, "--version"]).decode().strip()
    print(f"\nbase + up to {len(EXPERTS)} experts; median of {REPEAT} run(s) each ({MERGEKIT_REPEAT} for mergekit); "
          f"{version}, mergekit 0.1.5; "
          f"{os.cpu_count()} cores; {datetime.date.today().isoformat()}\n")
    print("| method | obim wall (s) | obim user + system CPU (s) | obim peak RSS (MiB) | mergekit wall (s) "
          "| mergekit peak RSS (MiB) | obim / mergekit | obim / floor | obim / task arithmetic |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")

    def f(x, d=1):
        return "—" if x is None else f"{x:.{d}f}"

    for label, ow, orss, cpu, mw, mrss, fl in rows:
        ratio = "—" if mw is None or ow is None else f"{ow / mw:.2f}"
        vs_floor = "—" if fl is None or ow is None else f"{ow / fl:.2f}"
        vs_ta = "—" if task_arithmetic is None or ow is None or fl is None else f"{ow / task_arithmetic:.2f}"
        cpu = "—" if cpu is None else f"{cpu[0]:.1f} + {cpu[1]:.1f}"
        print(f"| {label} | {f(ow)} | {cpu} | {f(orss, 0)} | {f(mw)} | {f(mrss, 0)} | {ratio} | {vs_floor} | {vs_ta} |")
    for w in WARNINGS:
        print(w)
    for fail in failures:
        print(f"FAILED {fail}")
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
