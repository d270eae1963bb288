#!/usr/bin/env python3
"""Builds tests/goldens/mergekit/: a tiny random Llama family (a base and three
experts, bf16) and mergekit 0.1.5's merges of it, which obim's tests compare
against (tests/mergekit.rs).

    python3 tools/mergekit_goldens.py            # makes .venv-mergekit, installs mergekit==0.1.5

Every merge runs with `dtype: float32` and `out_dtype: bfloat16`, as obim does
(arithmetic in f32, output bf16). The .obim recipe beside each mergekit config
asks obim for the same merge.
"""
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "goldens", "mergekit")
VENV = os.environ.get("OBIM_MERGEKIT_VENV", os.path.join(ROOT, ".venv-mergekit"))
MERGEKIT = "mergekit==0.1.5"


def in_venv():
    return os.path.abspath(sys.prefix) == os.path.abspath(VENV)


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", MERGEKIT])
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


# name -> (mergekit config without base/models paths filled, obim recipe body)
MERGES = {
    "linear": (
        {"merge_method": "linear", "models": [("a", {"weight": 1.0}), ("b", {"weight": 0.5}), ("c", {"weight": 0.25})]},
        "merge m = linear {\n    a weight 1.0\n    b weight 0.5\n    c weight 0.25\n}",
    ),
    "task_arithmetic": (
        {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.8},
         "models": [("a", {"weight": 1.0}), ("b", {"weight": 0.6}), ("c", {"weight": -0.3})]},
        "merge m = task_arithmetic(base: base, lambda: 0.8) {\n    a weight 1.0\n    b weight 0.6\n    c weight -0.3\n}",
    ),
    "ties": (
        {"merge_method": "ties",
         "models": [("a", {"weight": 1.0, "density": 0.5}), ("b", {"weight": 0.8, "density": 0.3}), ("c", {"weight": 0.5, "density": 0.7})]},
        "merge m = ties(base: base) {\n    a weight 1.0 density 0.5\n    b weight 0.8 density 0.3\n    c weight 0.5 density 0.7\n}",
    ),
    "ties_unnormalized": (
        {"merge_method": "ties", "parameters": {"normalize": False, "rescale": True},
         "models": [("a", {"weight": 1.0, "density": 0.4}), ("b", {"weight": 1.0, "density": 0.4})]},
        "merge m = ties(base: base, normalize: false, rescale: true, density: 0.4) {\n    a weight 1.0\n    b weight 1.0\n}",
    ),
    "slerp": (
        {"merge_method": "slerp", "base": "a", "parameters": {"t": 0.3}, "models": [("a", {}), ("b", {})]},
        "merge m = slerp(base: a, t: 0.3) {\n    b\n}",
    ),
    "dare_linear": (
        {"merge_method": "dare_linear", "models": [("a", {"weight": 1.0, "density": 0.5})]},
        "merge m = dare_linear(base: base, density: 0.5, seed: 7) {\n    a weight 1.0\n}",
    ),
    "dare_ties": (
        {"merge_method": "dare_ties",
         "models": [("a", {"weight": 1.0, "density": 0.5}), ("b", {"weight": 1.0, "density": 0.5})]},
        "merge m = dare_ties(base: base, density: 0.5, seed: 7) {\n    a weight 1.0\n    b weight 1.0\n}",
    ),
}


def build_family():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(20251123)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(os.path.join(OUT, "base"), safe_serialization=True)
    for i, name in enumerate(["a", "b", "c"]):
        expert = LlamaForCausalLM(config).to(torch.bfloat16)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                delta = torch.randn_like(p, dtype=torch.float32) * (0.02 + 0.01 * i)
                # Some positions stay equal to the base, as in real fine-tunes.
                delta[torch.rand_like(delta) < 0.05] = 0
                p.copy_((p.float() + delta).to(torch.bfloat16))
        expert.save_pretrained(os.path.join(OUT, name), safe_serialization=True)


def mergekit_config(spec):
    cfg = {"merge_method": spec["merge_method"], "dtype": "float32", "out_dtype": "bfloat16"}
    base = spec.get("base", "base")
    cfg["base_model"] = os.path.join(OUT, base)
    cfg["models"] = [{"model": os.path.join(OUT, m), **({"parameters": p} if p else {})} for m, p in spec["models"]]
    if "parameters" in spec:
        cfg["parameters"] = spec["parameters"]
    if spec["merge_method"] == "linear":
        del cfg["base_model"]
    return cfg


def main():
    if not in_venv():
        ensure_venv()
    import yaml

    os.makedirs(OUT, exist_ok=True)
    build_family()
    for name, (spec, body) in MERGES.items():
        cfg_path = os.path.join(OUT, f"{name}.yml")
        with open(cfg_path, "w") as f:
            yaml.safe_dump(mergekit_config(spec), f, sort_keys=False)
        out = os.path.join(OUT, "expected", name)
        subprocess.check_call([os.path.join(VENV, "bin", "mergekit-yaml"), cfg_path, out, "--no-copy-tokenizer",
                               "--no-write-model-card", "--random-seed", "7", "--quiet"])
        for f in os.listdir(out):
            if f not in ("model.safetensors", "config.json"):
                os.remove(os.path.join(out, f))
        used = [m for m, _ in spec["models"]]
        models = "".join(f'model {m} = "./{m}"\n' for m in ["a", "b", "c"] if m in used)
        base_decl = 'base base = "./base"\n' if spec["merge_method"] not in ("linear", "slerp") else ""
        recipe = (f"# The merge of {cfg_path.rsplit('/', 1)[1]}, for obim (tests/mergekit.rs).\n"
                  f"{base_decl}{models}\n"
                  f"{body}\n\noutput m -> \"out/{name}\" {{ dtype bf16 }}\n")
        with open(os.path.join(OUT, f"{name}.obim"), "w") as f:
            f.write(recipe)
    # Paths in the yml files are this machine's: keep them relative.
    for name in MERGES:
        p = os.path.join(OUT, f"{name}.yml")
        with open(p) as f:
            text = f.read().replace(OUT + "/", "./")
        with open(p, "w") as f:
            f.write(text)
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers")}
    versions["mergekit"] = MERGEKIT
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
