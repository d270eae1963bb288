#!/usr/bin/env python3
"""The calibration benchmark: obim's layer-by-layer forward with statistics
(`obim stats`) against `transformers` with forward hooks collecting the same
statistics (Σ x² of every nn.Linear input, float64), on the same model, the
same texts and the same number of threads, each sequence run alone. Prints a
markdown table: wall time of the whole process (loading included), tokens per
second, peak RSS; for transformers also the forward time alone.

    python3 bench/calibrate.py [--samples 8] [--threads 2]

Model: bench/data/base (the merge benchmark's 814M-parameter bf16 Llama; run
bench/run.py first, or set OBIM_BENCH_DATA), with the demo family's character
tokenizer copied in. Texts: 256-character pieces of the Python standard
library's sources (257 tokens each with `<bos>`). Needs the bench venv
(OBIM_BENCH_VENV; mergekit's installs torch and transformers).
"""
import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
VENV = os.environ.get("OBIM_BENCH_VENV", os.path.join(HERE, ".venv"))
DATA = os.environ.get("OBIM_BENCH_DATA", os.path.join(HERE, "data"))
OBIM = os.path.join(ROOT, "target", "release", "obim")
sys.path.insert(0, HERE)
from run import measure, quiet  # noqa: E402

HOOKS = r'''
import json, sys, time, torch
from transformers import AutoModelForCausalLM
from tokenizers import Tokenizer
model_dir, data, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(threads)
t0 = time.monotonic()
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
tok = Tokenizer.from_file(model_dir + "/tokenizer.json")
texts = [json.loads(l)["text"] for l in open(data)]
sums = {}
def hook(name, x):
    x = x.detach().double().reshape(-1, x.shape[-1])
    sums[name] = sums.get(name, 0) + (x * x).sum(0)
for name, m in model.model.named_modules():
    if isinstance(m, torch.nn.Linear):
        m.register_forward_hook(lambda mod, i, o, name=name: hook(name, i[0]))
t1 = time.monotonic()
tokens = 0
with torch.no_grad():
    for t in texts:
        ids = torch.tensor([tok.encode(t).ids])
        tokens += ids.shape[1]
        # lm_head's input is the decoder's output: the same statistic without the vocabulary product.
        hook("lm_head", model.model(ids).last_hidden_state)
print(json.dumps({"tokens": tokens, "forward_s": time.monotonic() - t1}), file=sys.stderr)
'''


def texts(n, path):
    lib = sysconfig.get_paths()["stdlib"]
    out = []
    for f in sorted(glob.glob(os.path.join(lib, "*.py"))):
        src = "".join(c for c in open(f, encoding="utf-8", errors="ignore").read() if 32 <= ord(c) < 127 or c == "\n")
        if len(src) > 4096:
            out.append(src[1024:1280])
        if len(out) == n:
            break
    with open(path, "w") as o:
        for t in out:
            o.write(json.dumps({"text": t}) + "\n")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    model = os.path.join(DATA, "base")
    if not os.path.exists(os.path.join(model, "config.json")):
        raise SystemExit(f"{model} is missing: run bench/run.py first (it generates the family)")
    shutil.copy(os.path.join(ROOT, "examples", "demo", "base", "tokenizer.json"), model)
    subprocess.check_call(["cargo", "build", "--release", "--locked", "-q"], cwd=ROOT)
    data = os.path.join(DATA, "calib.jsonl")
    texts(a.samples, data)
    py = os.path.join(VENV, "bin", "python")
    script = os.path.join(DATA, "hooks.py")
    open(script, "w").write(HOOKS)

    o_wall, o_rss = measure([OBIM, "stats", model, "--data", data, "--threads", str(a.threads), "-o", os.path.join(DATA, "stats.safetensors")],
                           "obim stats")
    quiet("transformers + hooks")
    start = time.monotonic()
    proc = subprocess.Popen([py, script, model, data, str(a.threads)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    t_wall = time.monotonic() - start
    err = proc.stderr.read().decode()
    if status != 0:
        raise SystemExit(err)
    info = json.loads(err.strip().splitlines()[-1])
    tokens = info["tokens"]
    t_rss = usage.ru_maxrss / 1024
    print(f"\n814M-parameter Llama (bf16 on disk, f32 compute), {a.samples} sequences, {tokens} tokens, {a.threads} threads\n")
    print("| tool | wall (s) | tokens/s | peak RSS (MiB) |")
    print("| --- | --- | --- | --- |")
    print(f"| obim stats (layer by layer) | {o_wall:.1f} | {tokens / o_wall:.0f} | {o_rss:.0f} |")
    print(f"| transformers + hooks | {t_wall:.1f} | {tokens / t_wall:.0f} | {t_rss:.0f} |")
    print(f"| transformers, forward alone | {info['forward_s']:.1f} | {tokens / info['forward_s']:.0f} | — |")
    print(f"\nobim / transformers wall time: {o_wall / t_wall:.2f}")


if __name__ == "__main__":
    main()
