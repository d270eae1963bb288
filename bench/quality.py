#!/usr/bin/env python3
"""Merge quality on the alpha_dom family: runs bench/quality/alpha_dom.obim
(task arithmetic, TIES, OBIM and RegMean, each with fixed settings and with
settings chosen by obim by loss on the calibration split), scores every
output with `obim eval --loss` on each domain's test split, and prints a
markdown table: held-out loss per domain and the share of the experts' gains
kept, (L_base − L_merge) / (L_base − L_expert), averaged over domains.

    cargo build --release && python3 bench/quality.py

Needs ../shared/fixtures/alpha_dom beside the repository (the developers'
fixtures); the chosen settings are read from each output's obim-report.json.
"""
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FAMILY = os.path.join(os.path.dirname(ROOT), "shared", "fixtures", "alpha_dom")
OBIM = os.path.join(ROOT, "target", "release", "obim")
RECIPE = os.path.join(HERE, "quality", "alpha_dom.obim")
DOMAINS = ["c", "perl", "js"]

if not os.path.isdir(FAMILY):
    sys.exit(f"skipped: {FAMILY} is not there (the developers' fixtures)")
cache = tempfile.mkdtemp(prefix="obim-quality-")
subprocess.run([OBIM, "run", "--force", "--cache", cache, RECIPE], check=True)
out_dir = os.path.join(HERE, "quality", "out")
outputs = sorted(os.listdir(out_dir))
data = [a for d in DOMAINS for a in ("--data", os.path.join(FAMILY, "data", d, "test.jsonl"))]
result = subprocess.run(
    [OBIM, "eval", *[os.path.join(out_dir, o) for o in outputs], *data, "--loss", "--format", "json"],
    check=True, capture_output=True, text=True,
)
scores = json.load(open(os.path.join(FAMILY, "scores.json")))["loss"]
print("| merge | settings | " + " | ".join(DOMAINS) + " | kept |")
print("| --- | --- | " + " | ".join("---" for _ in DOMAINS) + " | --- |")
for model in json.loads(result.stdout)["models"]:
    name = os.path.basename(model["model"])
    report = json.load(open(os.path.join(model["model"], "obim-report.json")))
    sel = report.get("selection", {}).get(report["merge"])
    chosen = "chose " + sel["candidates"][sel["winner"]]["candidate"] if sel else "fixed"

    kept = []
    losses = []
    for s in model["scores"]:
        d = os.path.basename(os.path.dirname(s["file"]))
        losses.append(s["loss"])
        kept.append((scores["base"][d] - s["loss"]) / (scores["base"][d] - scores["expert_" + d][d]))
    print(f"| {name} | {chosen} | " + " | ".join(f"{l:.3f}" for l in losses)
          + f" | {100 * sum(kept) / len(kept):.1f}% |")
