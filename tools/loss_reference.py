#!/usr/bin/env python3
"""Writes tests/goldens/loss.json: for every model of the demo family and
every task, the mean over the first 32 texts of data/<task>/calib.jsonl of the
mean next-token negative log-likelihood (nats) of `<bos>` + text, computed by
`transformers` (float32, CPU, eager attention, `model(ids, labels=ids).loss`).
tests/forward.rs checks `obim eval --loss` against it (1e-4).

    python3 tools/loss_reference.py      # needs torch and transformers (e.g. tools/make_arch_refs.py's venv)
"""
import json
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "examples", "demo")
out = {"texts": 32, "field": "text", "loss": {}}
for model_name in ["base", "expert_add", "expert_reverse", "expert_sort"]:
    d = os.path.join(DEMO, model_name)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    out["loss"][model_name] = {}
    for task in ["add", "reverse", "sort"]:
        texts = [json.loads(l)["text"] for l in open(os.path.join(DEMO, "data", task, "calib.jsonl"))][:32]
        losses = []
        with torch.no_grad():
            for t in texts:
                ids = torch.tensor([tok.encode(t).ids])
                losses.append(model(ids, labels=ids).loss.item())
        out["loss"][model_name][task] = sum(losses) / len(losses)
os.makedirs(os.path.join(ROOT, "tests", "goldens"), exist_ok=True)
with open(os.path.join(ROOT, "tests", "goldens", "loss.json"), "w") as f:
    json.dump(out, f, indent=1)
print(json.dumps(out["loss"], indent=1))
