#!/usr/bin/env python3
"""Builds tests/goldens/mergekit/: a tiny random Llama family (a base and three
experts, bf16) and mergekit 0.1.5's merges of it, which obim's tests compare
against (tests/mergekit.rs).

    python3 tools/mergekit_goldens.py            # makes .venv-mergekit, installs mergekit==0.1.5
    python3 tools/mergekit_goldens.py ram sce    # reruns only the merges named
    python3 tools/mergekit_goldens.py examples   # reruns mergekit's six examples only
    python3 tools/mergekit_goldens.py example_ties example_linear   # or some of them

Every merge runs with `dtype: float32` and `out_dtype: bfloat16`, as obim does
(arithmetic in f32, output bf16). The .obim recipe beside each mergekit config
asks obim for the same merge.

The family (base, a, b, c) and the deep family (deep/base, deep/a, deep/b: six
layers, for gradients and layer stacking; deep/c, a third expert added later
with its own seed) are built only when absent: the committed goldens depend on
them, so the script never regenerates them.

mergekit's own example configs, moved onto the deep family, live in
examples/mergekit/ (NAME.yml and NAME.obim); their mergekit outputs go to
expected/example_NAME/ (f16 where the original says float16, bf16 where it says
bfloat16; always computed in float32).
"""
import json
import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "goldens", "mergekit")
VENV = os.environ.get("OBIM_MERGEKIT_VENV", os.path.join(ROOT, ".venv-mergekit"))
MERGEKIT = "mergekit==0.1.5"
# The transformers the committed goldens were written with: it stamps each
# config.json's "transformers_version", and a newer one would change them all.
TRANSFORMERS = "transformers==5.23.0"


def in_venv():
    return os.path.abspath(sys.prefix) == os.path.abspath(VENV)


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", MERGEKIT, TRANSFORMERS])
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
    "breadcrumbs": (
        {"merge_method": "breadcrumbs",
         "models": [("a", {"weight": 1.0, "density": 0.8, "gamma": 0.05}), ("b", {"weight": 0.5, "density": 0.7, "gamma": 0.02})]},
        "merge m = breadcrumbs(base: base) {\n    a weight 1.0 density 0.8 gamma 0.05\n    b weight 0.5 density 0.7 gamma 0.02\n}",
    ),
    "breadcrumbs_ties": (
        {"merge_method": "breadcrumbs_ties",
         "models": [("a", {"weight": 1.0, "density": 0.7, "gamma": 0.03}), ("b", {"weight": 0.8, "density": 0.6, "gamma": 0.03}),
                    ("c", {"weight": 0.6, "density": 0.9, "gamma": 0.01})]},
        "merge m = breadcrumbs_ties(base: base) {\n    a weight 1.0 density 0.7 gamma 0.03\n    b weight 0.8 density 0.6 gamma 0.03\n"
        "    c weight 0.6 density 0.9 gamma 0.01\n}",
    ),
    # At density 1 della's random draw is skipped (density >= 1 returns the delta).
    "della_density1": (
        {"merge_method": "della", "models": [("a", {"weight": 1.0, "density": 1.0}), ("b", {"weight": 0.7, "density": 1.0})]},
        "merge m = della(base: base) {\n    a weight 1.0 density 1.0\n    b weight 0.7 density 1.0\n}",
    ),
    "model_stock": (
        {"merge_method": "model_stock", "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = model_stock(base: base) {\n    a\n    b\n    c\n}",
    ),
    "model_stock_filter_wise": (
        {"merge_method": "model_stock", "parameters": {"filter_wise": True}, "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = model_stock(base: base, filter_wise: true) {\n    a\n    b\n    c\n}",
    ),
    "nuslerp": (
        {"merge_method": "nuslerp", "base": None, "models": [("a", {"weight": 0.3}), ("b", {"weight": 0.7})]},
        "merge m = nuslerp {\n    a weight 0.3\n    b weight 0.7\n}",
    ),
    "nuslerp_rows": (
        {"merge_method": "nuslerp", "base": None, "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
         "models": [("a", {"weight": 0.4}), ("b", {"weight": 0.6})]},
        "merge m = nuslerp(nuslerp_flatten: false, nuslerp_row_wise: true) {\n    a weight 0.4\n    b weight 0.6\n}",
    ),
    "nuslerp_columns": (
        {"merge_method": "nuslerp", "base": None, "parameters": {"nuslerp_flatten": False},
         "models": [("a", {"weight": 0.4}), ("b", {"weight": 0.6})]},
        "merge m = nuslerp(nuslerp_flatten: false) {\n    a weight 0.4\n    b weight 0.6\n}",
    ),
    "nuslerp_task": (
        {"merge_method": "nuslerp", "models": [("a", {"weight": 0.5}), ("b", {"weight": 0.5})]},
        "merge m = nuslerp(base: base) {\n    a weight 0.5\n    b weight 0.5\n}",
    ),
    "multislerp": (
        {"merge_method": "multislerp", "models": [("a", {"weight": 1.0}), ("b", {"weight": 1.0}), ("c", {"weight": 0.5})]},
        "merge m = multislerp(base: base) {\n    a weight 1.0\n    b weight 1.0\n    c weight 0.5\n}",
    ),
    "multislerp_nobase": (
        {"merge_method": "multislerp", "base": None, "models": [("a", {"weight": 0.2}), ("b", {"weight": 0.3}), ("c", {"weight": 0.5})]},
        "merge m = multislerp {\n    a weight 0.2\n    b weight 0.3\n    c weight 0.5\n}",
    ),
    # karcher's base policy is "ignored": a base_model would be added to the
    # inputs (plan.py: "Base model specified but not in input models - adding")
    # and averaged like any other model. None is given.
    "karcher": (
        {"merge_method": "karcher", "base": None, "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = karcher {\n    a\n    b\n    c\n}",
    ),
    "sce": (
        {"merge_method": "sce", "parameters": {"select_topk": 0.5}, "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = sce(base: base, select_topk: 0.5) {\n    a\n    b\n    c\n}",
    ),
    "sce_all": (
        {"merge_method": "sce", "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = sce(base: base) {\n    a\n    b\n    c\n}",
    ),
    "arcee_fusion": (
        {"merge_method": "arcee_fusion", "models": [("a", {})]},
        "merge m = arcee_fusion(base: base) {\n    a\n}",
    ),
    "nearswap": (
        {"merge_method": "nearswap", "parameters": {"t": 0.01}, "models": [("a", {})]},
        "merge m = nearswap(base: base, t: 0.01) {\n    a\n}",
    ),
    "passthrough": (
        {"merge_method": "passthrough", "base": None, "parameters": {"scale": 0.5}, "models": [("a", {})]},
        "merge m = passthrough(scale: 0.5) {\n    a\n}",
    ),
    "ram": (
        {"merge_method": "ram", "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = ram(base: base) {\n    a\n    b\n    c\n}",
    ),
    "ram_eps": (
        {"merge_method": "ram", "parameters": {"epsilon": 0.01}, "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = ram(base: base, epsilon: 0.01) {\n    a\n    b\n    c\n}",
    ),
    "ramplus_tl": (
        {"merge_method": "ramplus_tl", "parameters": {"r": 0.2, "alpha": 0.3}, "models": [("a", {}), ("b", {}), ("c", {})]},
        "merge m = ramplus_tl(base: base, r: 0.2, alpha: 0.3) {\n    a\n    b\n    c\n}",
    ),
}

# Merges of the deep family (deep/base, deep/a, deep/b: six layers), as whole
# mergekit configs; model paths are relative to tests/goldens/mergekit/. No
# .obim is written for these: the .obim recipes for deep_* live under
# tests/goldens/mergekit/ and are written by hand.
DEEP_MERGES = {
    # mergekit's examples/gradient-slerp.yml, at six layers.
    "deep_gradient_slerp": {
        "slices": [{"sources": [{"model": "deep/a", "layer_range": [0, 6]}, {"model": "deep/b", "layer_range": [0, 6]}]}],
        "merge_method": "slerp",
        "base_model": "deep/a",
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                             {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                             {"value": 0.5}]},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    "deep_gradient_ties": {
        "merge_method": "ties",
        "base_model": "deep/base",
        "models": [{"model": "deep/a", "parameters": {"weight": [1.0, 0.5, 0.0], "density": 0.5}},
                   {"model": "deep/b", "parameters": {"weight": [0.0, 0.5, 1.0], "density": 0.7}}],
        "parameters": {"normalize": True},
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    # mergekit's examples/orcamini-platy-44layer.yml, at small scale: 8 layers out
    # (a's layers 0-3, then b's 2-5). mergekit takes model.embed_tokens from the
    # first slice's model (a) and model.norm and lm_head from the last one's (b).
    "deep_stack": {
        "slices": [{"sources": [{"model": "deep/a", "layer_range": [0, 4]}]},
                   {"sources": [{"model": "deep/b", "layer_range": [2, 6]}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
    # Stacked slices whose sources are merged (linear, weight 0.5 each): 6 layers out.
    "deep_stack_merged": {
        "slices": [{"sources": [{"model": "deep/a", "layer_range": [0, 3], "parameters": {"weight": 0.5}},
                                {"model": "deep/b", "layer_range": [0, 3], "parameters": {"weight": 0.5}}]},
                   {"sources": [{"model": "deep/a", "layer_range": [3, 6], "parameters": {"weight": 0.5}},
                                {"model": "deep/b", "layer_range": [1, 4], "parameters": {"weight": 0.5}}]}],
        "merge_method": "linear",
        "dtype": "float32",
        "out_dtype": "bfloat16",
    },
}

# mergekit's own examples (its repository's examples/*.yml), rewritten onto the
# deep family in examples/mergekit/NAME.yml beside an obim recipe NAME.obim for
# the same merge; mergekit runs each yml as committed, from examples/mergekit/
# (its model paths are relative to it), into expected/example_NAME/.
EXAMPLES_DIR = os.path.join(ROOT, "examples", "mergekit")
EXAMPLES = ("arcee_fusion", "bio-merge", "gradient-slerp", "linear", "orcamini-platy-44layer", "ties")

# Files kept from each mergekit output (the rest is deleted).
KEEP = ("model.safetensors", "config.json", "logits.json")
STACK_LOGITS_INPUT = [[1, 5, 9, 13, 17, 21, 25, 29]]


def build_family(out=OUT, num_hidden_layers=2, seed=20251123, experts=("a", "b", "c")):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=num_hidden_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    base = LlamaForCausalLM(config).to(torch.bfloat16)
    base.save_pretrained(os.path.join(out, "base"), safe_serialization=True)
    for i, name in enumerate(experts):
        build_expert(base, os.path.join(out, name), 0.02 + 0.01 * i)


def build_expert(base, path, scale):
    """An expert: the base plus random deltas (scale times a standard normal),
    a few positions left equal to the base. Draws from torch's RNG as seeded."""
    import torch
    from transformers import LlamaForCausalLM

    expert = LlamaForCausalLM(base.config).to(torch.bfloat16)
    expert.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in expert.parameters():
            delta = torch.randn_like(p, dtype=torch.float32) * scale
            # Some positions stay equal to the base, as in real fine-tunes.
            delta[torch.rand_like(delta) < 0.05] = 0
            p.copy_((p.float() + delta).to(torch.bfloat16))
    expert.save_pretrained(path, safe_serialization=True)


def build_deep_c(deep):
    """deep/c, the deep family's third expert (added after deep/a and deep/b were
    committed): made as they were, from deep/base as saved, with its own seed and
    the third expert's scale (0.04)."""
    import torch
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(os.path.join(deep, "base"), dtype=torch.bfloat16)
    torch.manual_seed(20251125)
    build_expert(base, os.path.join(deep, "c"), 0.02 + 0.01 * 2)


def mergekit_config(spec):
    cfg = {"merge_method": spec["merge_method"], "dtype": "float32", "out_dtype": "bfloat16"}
    base = None if spec["merge_method"] == "linear" else spec.get("base", "base")
    if base is not None:
        cfg["base_model"] = os.path.join(OUT, base)
    cfg["models"] = [{"model": os.path.join(OUT, m), **({"parameters": p} if p else {})} for m, p in spec["models"]]
    if "parameters" in spec:
        cfg["parameters"] = spec["parameters"]
    return cfg


def absolute_paths(cfg):
    """A DEEP_MERGES config with its model paths made absolute (mergekit runs it from anywhere)."""
    if isinstance(cfg, dict):
        return {k: (os.path.join(OUT, v) if k in ("model", "base_model") else absolute_paths(v)) for k, v in cfg.items()}
    if isinstance(cfg, list):
        return [absolute_paths(v) for v in cfg]
    return cfg


def run_mergekit(name, cfg):
    import yaml

    cfg_path = os.path.join(OUT, f"{name}.yml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    out = os.path.join(OUT, "expected", name)
    subprocess.check_call([os.path.join(VENV, "bin", "mergekit-yaml"), cfg_path, out, "--no-copy-tokenizer",
                           "--no-write-model-card", "--random-seed", "7", "--quiet"])
    for f in os.listdir(out):
        if f not in KEEP:
            os.remove(os.path.join(out, f))
    # Paths in the yml files are this machine's: keep them relative.
    with open(cfg_path) as f:
        text = f.read().replace(OUT + "/", "./")
    with open(cfg_path, "w") as f:
        f.write(text)
    return cfg_path


def run_example(name):
    """mergekit on examples/mergekit/NAME.yml, run from that folder, into
    expected/example_NAME/ (model.safetensors and config.json)."""
    out = os.path.join(OUT, "expected", f"example_{name}")
    subprocess.check_call([os.path.join(VENV, "bin", "mergekit-yaml"), f"{name}.yml", out, "--no-copy-tokenizer",
                           "--no-write-model-card", "--random-seed", "7", "--quiet"], cwd=EXAMPLES_DIR)
    for f in os.listdir(out):
        if f not in ("model.safetensors", "config.json"):
            os.remove(os.path.join(out, f))


def obim_recipe(name, spec, body):
    """The .obim beside NAME.yml: declares the base only when the body merges
    onto it (`base: base`), and every model the body names (inputs and a model
    used as a base, as slerp's `base: a`)."""
    used = {m for m, _ in spec["models"]}
    used |= {m for m in ("a", "b", "c") if re.search(rf"\bbase: {m}\b", body)}
    models = "".join(f'model {m} = "./{m}"\n' for m in ["a", "b", "c"] if m in used)
    base_decl = 'base base = "./base"\n' if "base: base" in body else ""
    return (f"# The merge of {name}.yml, for obim (tests/mergekit.rs).\n"
            f"{base_decl}{models}\n"
            f"{body}\n\noutput m -> \"out/{name}\" {{ dtype bf16 }}\n")


def stack_logits(name):
    """Reference logits of a stacked output (float32 forward pass with transformers)."""
    import torch
    from transformers import LlamaForCausalLM

    path = os.path.join(OUT, "expected", name)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor(STACK_LOGITS_INPUT)).logits[0]
    data = {"input_ids": STACK_LOGITS_INPUT,
            "logits": [[float(f"{x:.6g}") for x in row] for row in logits.tolist()]}
    with open(os.path.join(path, "logits.json"), "w") as f:
        json.dump(data, f, separators=(",", ":"))
        f.write("\n")


def main():
    if not in_venv():
        ensure_venv()

    os.makedirs(OUT, exist_ok=True)
    if not os.path.exists(os.path.join(OUT, "base", "model.safetensors")):
        build_family()
    deep = os.path.join(OUT, "deep")
    if not os.path.exists(os.path.join(deep, "base", "model.safetensors")):
        build_family(deep, num_hidden_layers=6, seed=20251124, experts=("a", "b"))
    if not os.path.exists(os.path.join(deep, "c", "model.safetensors")):
        build_deep_c(deep)
    only = set(sys.argv[1:])  # optional: names of the merges to (re)run
    for name, (spec, body) in MERGES.items():
        if only and name not in only:
            continue
        run_mergekit(name, mergekit_config(spec))
        with open(os.path.join(OUT, f"{name}.obim"), "w") as f:
            f.write(obim_recipe(name, spec, body))
    for name, cfg in DEEP_MERGES.items():
        if only and name not in only:
            continue
        run_mergekit(name, absolute_paths(cfg))
    for name in EXAMPLES:
        if only and f"example_{name}" not in only and "examples" not in only:
            continue
        run_example(name)
    if not only or "deep_stack" in only:
        stack_logits("deep_stack")
    versions = {m: __import__(m).__version__ for m in ("torch", "transformers")}
    versions["mergekit"] = MERGEKIT
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1)


if __name__ == "__main__":
    main()
