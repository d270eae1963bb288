#!/usr/bin/env python3
"""Writes tests/goldens/loss.json: for every model of the demo family and
every task, the mean over the first 32 texts of data/<task>/calib.jsonl of the
mean next-token negative log-likelihood (nats) of `<bos>` + text, computed by
`transformers` (float32, CPU, eager attention, `model(ids, labels=ids).loss`),
and under "answer_loss" the same models' loss of the answer given the prompt
on the same 32 lines: ids = tokenizer(prompt + answer), the mean over the
positions t ≥ len(tokenizer(prompt)) of −log p(ids[t] | ids[:t]).
tests/it/forward.rs checks `obim eval --loss` against both (1e-4).

    python3 tools/loss_reference.py      # needs torch and transformers (e.g. tools/make_arch_refs.py's venv)
"""
import json
import os

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "examples", "demo")
out = {"texts": 32, "field": "text", "loss": {}, "answer_loss": {}}
for model_name in ["base", "expert_add", "expert_reverse", "expert_sort"]:
    d = os.path.join(DEMO, model_name)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    out["loss"][model_name] = {}
    out["answer_loss"][model_name] = {}
    for task in ["add", "reverse", "sort"]:
        rows = [json.loads(l) for l in open(os.path.join(DEMO, "data", task, "calib.jsonl"))][:32]
        answer_losses = []
        with torch.no_grad():
            for r in rows:
                ids = tok.encode(r["prompt"] + r["answer"]).ids
                start = len(tok.encode(r["prompt"]).ids)
                logits = model(torch.tensor([ids])).logits[0]
                logp = torch.log_softmax(logits[start - 1 : len(ids) - 1], dim=-1)
                target = torch.tensor(ids[start:]).unsqueeze(1)
                answer_losses.append(-logp.gather(1, target).mean().item())
        out["answer_loss"][model_name][task] = sum(answer_losses) / len(answer_losses)
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
print(json.dumps({"loss": out["loss"], "answer_loss": out["answer_loss"]}, indent=1))
