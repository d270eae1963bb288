#!/usr/bin/env python3
"""Loads model directories with `transformers` (as a user would) and prints
greedy exact-match accuracy on the demo family's test sets, with the
conventions of examples/demo/README.md (float32 forward of the stored
weights on CPU, `<bos>` + prompt, up to max(answer length)+2 new tokens, stop
at `<eos>`).

    python3 tools/eval_with_transformers.py examples/demo/out/demo examples/demo/expert_add ...

Needs torch and transformers (e.g. the venv tools/mergekit_goldens.py makes).
"""
import json
import os
import sys

import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "demo", "data")


def accuracy(model, tok, path, limit=200):
    rows = [json.loads(l) for l in open(path)][:limit]
    budget = max(len(r["answer"]) for r in rows) + 2
    eos = tok.token_to_id("<eos>")
    right = 0
    for r in rows:
        ids = tok.encode(r["prompt"]).ids
        x = torch.tensor([ids])
        out = model.generate(x, max_new_tokens=budget, do_sample=False, eos_token_id=eos, pad_token_id=0)
        new = out[0, len(ids):].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        right += tok.decode(new) == r["answer"]
    return right / len(rows)


def main():
    tasks = sorted(os.listdir(DATA))
    print("model".ljust(40) + "".join(t.ljust(10) for t in tasks))
    for d in sys.argv[1:]:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
        accs = [accuracy(model, tok, os.path.join(DATA, t, "test.jsonl")) for t in tasks]
        print(d.ljust(40) + "".join(f"{a:<10.3f}" for a in accs))


if __name__ == "__main__":
    main()
