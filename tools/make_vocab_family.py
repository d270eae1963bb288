#!/usr/bin/env python3
"""Builds tests/goldens/vocab/: a family whose experts added tokens (as
fine-tunes adding chat or tool tokens do) and mergekit 0.1.5's merges of it
with a merged tokenizer (tokenizer_source union, base, or a model).

    python3 tools/make_vocab_family.py               # uses (or makes) .venv-mergekit
    python3 tools/make_vocab_family.py union_linear  # reruns only the merges named

The family, in tests/goldens/vocab/:
  base   examples/demo/base loaded and saved again (425k-param Llama, 100 tokens,
         bf16 safetensors and the tokenizer files save_pretrained writes)
  tools  base + seeded noise on every weight, and two added special tokens
         "<tool_call>", "</tool_call>" (ids 100, 101): 102 rows
  chat   base + other seeded noise, two added special tokens "<|user|>",
         "<|assistant|>" (ids 100, 101) and one normal added token "xylophone"
         (id 102): 103 rows
The new rows of embed_tokens and lm_head are seeded draws of 0.5 * N(0, 1)
(the base's rows have a std of about 0.11 to 0.15), so they are easy to spot
in a merge. The family is built only when absent (the committed goldens
depend on it; rebuilt, it comes out byte for byte the same); the merges are
rerun every time. mergekit runs with the models in the order each config
lists them (see MERGEKIT_ORDERED: plain mergekit 0.1.5 orders them by set
order, which changes from run to run and changes the union's token ids), and
plain mergekit-yaml is run PLAIN_RUNS times (env, default 4) per merge to say
how often it gives the same files. `tokenizer: {source: union}`
(union_linear_block.yml) is checked to give union_linear's output and not kept.

Each merge's config is tests/goldens/vocab/NAME.yml, with paths relative to
tests/goldens/vocab/ (mergekit runs from there); its output goes to
expected/NAME/ (model.safetensors, config.json and the tokenizer files
mergekit writes). Every merge runs with `dtype: float32` and
`out_dtype: bfloat16`. After the merges each output is loaded with
transformers and its tokenizer length checked against its embedding rows and
config vocab_size; the summary is printed (README.md there records it).
"""
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "goldens", "vocab")
DEMO_BASE = os.path.join(ROOT, "examples", "demo", "base")
VENV = os.environ.get("OBIM_MERGEKIT_VENV", os.path.join(ROOT, ".venv-mergekit"))
MERGEKIT = "mergekit==0.1.5"
TRANSFORMERS = "transformers==5.23.0"

# name -> (seed, noise scale, added special tokens, added normal tokens)
EXPERTS = {
    "tools": (20260601, 0.02, ["<tool_call>", "</tool_call>"], []),
    "chat": (20260602, 0.03, ["<|user|>", "<|assistant|>"], ["xylophone"]),
}
ADDED = [t for _, _, special, normal in EXPERTS.values() for t in special + normal]

COMMON = {"dtype": "float32", "out_dtype": "bfloat16"}
# name -> mergekit config (paths relative to OUT)
MERGES = {
    "union_linear": {
        "merge_method": "linear",
        "models": [{"model": "./base", "parameters": {"weight": 1.0}},
                   {"model": "./tools", "parameters": {"weight": 1.0}},
                   {"model": "./chat", "parameters": {"weight": 1.0}}],
        "tokenizer_source": "union",
        **COMMON,
    },
    # The same merge with the newer form of the tokenizer key (a `tokenizer:`
    # block); mergekit 0.1.5 accepts both (config.py: not both at once).
    "union_linear_block": {
        "merge_method": "linear",
        "models": [{"model": "./base", "parameters": {"weight": 1.0}},
                   {"model": "./tools", "parameters": {"weight": 1.0}},
                   {"model": "./chat", "parameters": {"weight": 1.0}}],
        "tokenizer": {"source": "union"},
        **COMMON,
    },
    "base_ties": {
        "merge_method": "ties",
        "base_model": "./base",
        "models": [{"model": "./tools", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "./chat", "parameters": {"weight": 1.0, "density": 0.5}}],
        "tokenizer_source": "base",
        **COMMON,
    },
    "union_ta": {
        "merge_method": "task_arithmetic",
        "base_model": "./base",
        "models": [{"model": "./tools", "parameters": {"weight": 1.0}},
                   {"model": "./chat", "parameters": {"weight": 0.5}}],
        "tokenizer_source": "union",
        **COMMON,
    },
    # The `tokenizer:` block's other keys: per-token sources (a zero row, a
    # model's row of another token by text or by id, a token no model has),
    # `force`, `pad_to_multiple_of`; and a named chat template.
    "tokens_block": {
        "merge_method": "linear",
        "models": [{"model": "./base", "parameters": {"weight": 1.0}},
                   {"model": "./tools", "parameters": {"weight": 1.0}},
                   {"model": "./chat", "parameters": {"weight": 1.0}}],
        "tokenizer": {
            "source": "union",
            "pad_to_multiple_of": 8,
            "tokens": {
                "<tool_call>": {"source": {"kind": "model_token", "model": "./chat",
                                           "token": "<|user|>"}, "force": True},
                "<pad>": {"source": {"kind": "zero"}, "force": True},
                "<|assistant|>": {"source": {"kind": "model_token", "model": "./base",
                                             "token_id": 5}},
                "<|new|>": {"source": {"kind": "model_token", "model": "./tools",
                                       "token": "<tool_call>"}},
            },
        },
        "chat_template": "chatml",
        **COMMON,
    },
    "model_source": {
        "merge_method": "linear",
        "models": [{"model": "./tools", "parameters": {"weight": 1.0}},
                   {"model": "./chat", "parameters": {"weight": 1.0}}],
        "tokenizer_source": "./tools",
        **COMMON,
    },
}

# Plain mergekit-yaml runs per merge, compared with the ordered run (0: none).
PLAIN_RUNS = int(os.environ.get("PLAIN_RUNS", "4"))

# Merges whose output is not kept: it must equal the named merge's, file for file.
SAME_AS = {"union_linear_block": "union_linear"}

# Files kept from each mergekit output (the rest is deleted).
KEEP = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
        "special_tokens_map.json", "tokenizer.model", "added_tokens.json", "chat_template.jinja")


def in_venv():
    return os.path.abspath(sys.prefix) == os.path.abspath(VENV)


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", MERGEKIT, TRANSFORMERS])
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


def build_base():
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(DEMO_BASE, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(DEMO_BASE)
    assert len(tok) == model.config.vocab_size == model.get_input_embeddings().weight.shape[0]
    path = os.path.join(OUT, "base")
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def build_expert(name):
    """base (as saved in OUT) + seeded noise on every weight (5% of positions
    left equal to the base), then the added tokens and their new rows."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seed, scale, special, normal = EXPERTS[name]
    base_path = os.path.join(OUT, "base")
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(base_path)
    tied = model.config.tie_word_embeddings
    old_rows = model.get_input_embeddings().weight.shape[0]

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            delta = torch.randn_like(p, dtype=torch.float32) * scale
            delta[torch.rand_like(delta) < 0.05] = 0
            p.copy_((p.float() + delta).to(torch.bfloat16))

    if special:
        tok.add_special_tokens({"additional_special_tokens": special})
    if normal:
        tok.add_tokens(normal)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == len(tok) == old_rows + len(special) + len(normal)
    with torch.no_grad():
        emb = model.get_input_embeddings().weight
        emb[old_rows:] = (torch.randn(emb[old_rows:].shape) * 0.5).to(torch.bfloat16)
        head = model.get_output_embeddings().weight
        if head.data_ptr() != emb.data_ptr():
            head[old_rows:] = (torch.randn(head[old_rows:].shape) * 0.5).to(torch.bfloat16)
    model.config.vocab_size = rows
    assert model.config.tie_word_embeddings == tied
    path = os.path.join(OUT, name)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["vocab_size"] == rows and cfg.get("tie_word_embeddings", False) == tied, cfg


# mergekit-yaml, run in-process with one change: MergeConfiguration.referenced_models
# returns the models in the order the config lists them (base_model first)
# instead of a set's order. mergekit 0.1.5 collects them in a set, and the
# set's order decides the union tokenizer's ids for the added tokens (tokenizer
# build: the base's tokenizer, then the others in that order) and, without a
# base_model, which model's tokenizer the union starts from. On Python 3.11
# that order is not even fixed by PYTHONHASHSEED: ModelReference's hash covers
# hash(None) (its lora and override_architecture fields), which is the None
# object's address and so changes from process to process. The ordered run is
# one of the runs plain mergekit-yaml makes; the script also runs plain
# mergekit-yaml and says how many of a few runs gave the same files.
MERGEKIT_ORDERED = """
import re, sys
import mergekit.config as c
_set_order = c.MergeConfiguration.referenced_models
def _listed(self):
    listed = []
    def add(m):
        if m is not None and m not in listed:
            listed.append(m)
    add(self.base_model)
    for m in self.models or []:
        add(m.model)
    for s in self.slices or []:
        add(s.base_model)
        for src in s.sources:
            add(src.model)
    found = _set_order(self)
    return [m for m in listed if m in found] + [m for m in found if m not in listed]
c.MergeConfiguration.referenced_models = _listed
from mergekit.scripts.run_yaml import main
sys.argv[0] = "mergekit-yaml"
sys.exit(main())
"""


def run_mergekit(name, cfg, out, ordered=True):
    """mergekit-yaml on NAME.yml (written from cfg), run from OUT, into out;
    with ordered, the models in the order listed (see MERGEKIT_ORDERED)."""
    import shutil

    import yaml

    with open(os.path.join(OUT, f"{name}.yml"), "w") as f:
        yaml.safe_dump(cfg, f, sort_keys=False)
    if os.path.exists(out):
        shutil.rmtree(out)
    args = [f"{name}.yml", out, "--no-write-model-card", "--random-seed", "7", "--quiet"]
    if ordered:
        cmd = [os.path.join(VENV, "bin", "python"), "-c", MERGEKIT_ORDERED] + args
    else:
        cmd = [os.path.join(VENV, "bin", "mergekit-yaml")] + args
    subprocess.check_call(cmd, cwd=OUT)
    for f in os.listdir(out):
        if f not in KEEP:
            os.remove(os.path.join(out, f))


def same_files(a, b):
    import filecmp

    files = sorted(os.listdir(a))
    return files == sorted(os.listdir(b)) and all(
        filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False) for f in files)


def plain_runs(name, cfg, runs):
    """How many of `runs` plain mergekit-yaml runs of NAME give expected/NAME's files."""
    import tempfile

    same = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(runs):
            out = os.path.join(tmp, f"{name}_{i}")
            run_mergekit(name, cfg, out, ordered=False)
            same += same_files(out, os.path.join(OUT, "expected", name))
    return same


def check(name):
    """Loads expected/NAME with transformers; returns its summary."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = os.path.join(OUT, "expected", name)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    head_rows = model.get_output_embeddings().weight.shape[0]
    pad = (MERGES[name].get("tokenizer") or {}).get("pad_to_multiple_of") or 1
    # Padded rows (pad_to_multiple_of) are past the tokenizer's tokens.
    assert len(tok) <= rows == head_rows == model.config.vocab_size, (name, len(tok), rows, head_rows,
                                                                         model.config.vocab_size)
    assert rows == -(-len(tok) // pad) * pad, (name, len(tok), rows, pad)
    vocab = tok.get_vocab()
    return {"vocab_size": rows, "added_token_ids": {t: vocab[t] for t in ADDED if t in vocab},
            "files": sorted(os.listdir(path))}


def main():
    if not in_venv():
        ensure_venv()

    os.makedirs(OUT, exist_ok=True)
    if not os.path.exists(os.path.join(OUT, "base", "model.safetensors")):
        build_base()
    for name in EXPERTS:
        if not os.path.exists(os.path.join(OUT, name, "model.safetensors")):
            build_expert(name)

    only = set(sys.argv[1:])
    for name, cfg in MERGES.items():
        if only and name not in only:
            continue
        if name in SAME_AS:
            # Run into a scratch folder, compared with the committed twin's
            # output and not kept.
            import tempfile

            twin = os.path.join(OUT, "expected", SAME_AS[name])
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, name)
                run_mergekit(name, cfg, out)
                assert same_files(out, twin), (name, SAME_AS[name])
            print(f"{name}: output identical to expected/{SAME_AS[name]}/")
            continue
        run_mergekit(name, cfg, os.path.join(OUT, "expected", name))
        if PLAIN_RUNS:
            print(f"{name}: {plain_runs(name, cfg, PLAIN_RUNS)} of {PLAIN_RUNS} plain mergekit-yaml runs "
                  "gave the same files")

    summary = {name: check(name) for name in MERGES if name not in SAME_AS}
    print(json.dumps(summary, indent=1))

    from importlib.metadata import version

    versions = {"python": sys.version.split()[0], "mergekit": version("mergekit")}
    for m in ("torch", "transformers", "tokenizers", "safetensors"):
        versions[m] = __import__(m).__version__
    with open(os.path.join(OUT, "versions.json"), "w") as f:
        json.dump(versions, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
