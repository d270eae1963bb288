#!/usr/bin/env python3
"""Builds tests/lora/: two PEFT LoRA adapters for the demo base
(examples/demo/base, a 425k-parameter LlamaForCausalLM) and peft's own merge of
each, as references for obim's LoRA-adapter inputs.

    .venv-mergekit/bin/python tools/make_lora_refs.py

(the venv needs torch, transformers, safetensors and peft; versions used are
written to tests/lora/versions.json.)

| directory  | LoraConfig                                                         | seed |
| ---------- | ------------------------------------------------------------------ | ---- |
| `plain/`   | r=4, lora_alpha=8, all seven Llama linears (q,k,v,o,gate,up,down)  | 1234 |
| `rslora/`  | r=8, lora_alpha=16, use_rslora=True, q_proj, v_proj, down_proj     | 5678 |

Both: lora_dropout=0, bias="none", task_type CAUSAL_LM. peft initialises
lora_B to zero (a no-op adapter), so after get_peft_model every lora_A and
lora_B weight is overwritten with torch.randn(shape, generator) * 0.05, the
generator seeded as above and the parameters visited in sorted name order.

Each directory holds:
  adapter_config.json, adapter_model.safetensors  model.save_pretrained(dir)
                      (the model card peft writes beside them is dropped;
                      base_model_name_or_path is the repo-relative base path)
  expected.safetensors  base (float32) + adapter via PeftModel.from_pretrained,
                      merge_and_unload(); only the merged weights that differ
                      from the base (the targeted linears), float32, named as
                      in the base checkpoint (model.layers.0.self_attn.q_proj.weight);
                      where all of them pass 1000 KiB (plain/: 1.6 MB) only
                      layers 0 and 1 are kept (metadata "layers": "0,1" or "all")
  logits.json         that merged model's float32 logits (eager attention, CPU)
                      for input_ids [[1, 5, 9, 13, 17, 21]], 7 significant digits

Rerunning gives identical files (fixed seeds, CPU, deterministic ops).
"""
import json
import math
import os
import sys

import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file

import peft
from peft import LoraConfig, PeftModel, get_peft_model

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "lora")
BASE_REL = "examples/demo/base"
BASE = os.path.join(ROOT, BASE_REL)
INPUT_IDS = [[1, 5, 9, 13, 17, 21]]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

ADAPTERS = [
    dict(name="plain", seed=1234, r=4, lora_alpha=8, use_rslora=False, target_modules=ALL),
    dict(name="rslora", seed=5678, r=8, lora_alpha=16, use_rslora=True,
         target_modules=["q_proj", "v_proj", "down_proj"]),
]


def load_base():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(
        BASE, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


def sig7(x):
    return float(f"{x:.7g}")


def make(spec):
    name = spec["name"]
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)

    # 1. the adapter, with non-zero A and B
    base = load_base()
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["lora_alpha"],
                     target_modules=spec["target_modules"], lora_dropout=0.0,
                     bias="none", task_type="CAUSAL_LM", use_rslora=spec["use_rslora"])
    model = get_peft_model(base, cfg)
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.no_grad():
        for pname, p in sorted(model.named_parameters()):
            if ".lora_A." in pname or ".lora_B." in pname:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32) * 0.05)
    model.save_pretrained(d, safe_serialization=True)
    card = os.path.join(d, "README.md")
    if os.path.exists(card):
        os.remove(card)
    cpath = os.path.join(d, "adapter_config.json")
    with open(cpath) as f:
        acfg = json.load(f)
    acfg["base_model_name_or_path"] = BASE_REL
    if isinstance(acfg.get("target_modules"), list):
        acfg["target_modules"] = sorted(acfg["target_modules"])  # a set in peft
    with open(cpath, "w") as f:
        json.dump(acfg, f, indent=2, sort_keys=True)
        f.write("\n")

    # 2. peft's reference merge
    base_sd = {k: v.clone() for k, v in load_base().state_dict().items()}
    merged = PeftModel.from_pretrained(load_base(), d).merge_and_unload()
    merged.eval()
    msd = merged.state_dict()
    assert set(msd) == set(base_sd), set(msd) ^ set(base_sd)
    changed = {k: msd[k].detach().to(torch.float32).contiguous()
               for k in sorted(msd) if not torch.equal(msd[k], base_sd[k])}
    want = {k for k in base_sd
            if k.endswith(".weight") and k.split(".")[-2] in spec["target_modules"]}
    assert set(changed) == want, (sorted(set(changed) ^ want))

    # cross-check the formula W' = W + scale * B @ A against the saved adapter
    ad = load_file(os.path.join(d, "adapter_model.safetensors"))
    scale = spec["lora_alpha"] / (math.sqrt(spec["r"]) if spec["use_rslora"] else spec["r"])
    for k, w in changed.items():
        stem = "base_model.model." + k[: -len(".weight")]
        a = ad[stem + ".lora_A.weight"].double()
        b = ad[stem + ".lora_B.weight"].double()
        ref = base_sd[k].double() + scale * (b @ a)
        err = (ref - w.double()).abs().max().item()
        assert err < 1e-5, (k, err)

    # keep each file under 1 MiB: if all merged weights would not fit, only
    # layers 0 and 1 are stored (the adapter and logits.json still cover all)
    nbytes = sum(t.numel() * 4 for t in changed.values())
    layers = "all"
    if nbytes > 1000 * 1024:
        changed = {k: v for k, v in changed.items()
                   if k.startswith(("model.layers.0.", "model.layers.1."))}
        layers = "0,1"
    save_file(changed, os.path.join(d, "expected.safetensors"),
              metadata={"layers": layers, "scale": repr(scale)})

    # 3. logits of the merged model
    with torch.no_grad():
        logits = merged(input_ids=torch.tensor(INPUT_IDS)).logits.to(torch.float32)
    data = {"input_ids": INPUT_IDS,
            "logits": [[[sig7(x) for x in row] for row in b] for b in logits.tolist()]}
    with open(os.path.join(d, "logits.json"), "w") as f:
        json.dump(data, f)
        f.write("\n")

    return {"adapter_tensors": sorted(ad), "expected_tensors": sorted(changed),
            "scale": scale, "layers": layers}


def main():
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    info = {}
    for spec in ADAPTERS:
        info[spec["name"]] = make(spec)
        print(spec["name"], "scale", info[spec["name"]]["scale"],
              len(info[spec["name"]]["expected_tensors"]), "merged tensors in expected, layers",
              info[spec["name"]]["layers"])
    versions = {"python": sys.version.split()[0], "torch": torch.__version__,
                "transformers": transformers.__version__, "peft": peft.__version__,
                "safetensors": safetensors.__version__}
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=2, sort_keys=True)
        f.write("\n")
    print(json.dumps(versions))
    for n, i in info.items():
        print(n, "adapter tensors:", *i["adapter_tensors"][:4], "...", len(i["adapter_tensors"]))


if __name__ == "__main__":
    main()
