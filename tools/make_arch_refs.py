#!/usr/bin/env python3
"""Builds tests/archs/: tiny random checkpoints of the architectures obim runs
forward besides the demo family's Llama, with reference numbers computed by
`transformers`, which tests/archs.rs compares obim against.

    python3 tools/make_arch_refs.py     # makes .venv-archs, installs torch + transformers

| directory     | what it exercises                                              |
| ------------- | -------------------------------------------------------------- |
| `mistral/`    | MistralForCausalLM, GQA 4/1, `sliding_window` 8 (shorter than the prompts) |
| `qwen2/`      | Qwen2ForCausalLM: q/k/v biases, tied embeddings (no lm_head.weight), rope theta 1e6 |
| `llama3/`     | LlamaForCausalLM with `rope_scaling` type llama3 and explicit head_dim |

Each model: random init (seed fixed), saved in bfloat16 with the demo family's
character tokenizer (tokenizer.json: `<bos>` + one id per character). Then,
as the fixture families' references (their README): float32 forward on CPU,
eager attention; `reference.safetensors` holds `p<i>/input_ids`, `p<i>/logits`
for the prompts in its metadata, and `<module>` = Σ_t x_j² (float64
accumulation, stored float32) of every nn.Linear input over the texts in
`calib.jsonl`, each run alone, with `n_tokens`.
"""
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
OUT = os.path.join(ROOT, "tests", "archs")
VENV = os.environ.get("OBIM_ARCHS_VENV", os.path.join(ROOT, ".venv-archs"))
TOKENIZER = os.path.join(ROOT, "examples", "demo", "base")


def ensure_venv():
    if os.path.abspath(sys.prefix) == os.path.abspath(VENV):
        return
    py = os.path.join(VENV, "bin", "python")
    if not os.path.exists(py):
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", "torch", "transformers", "safetensors"])
    os.execv(py, [py, os.path.abspath(__file__)] + sys.argv[1:])


PROMPTS = [
    "12+35=",
    "sort:dbcafe=",
    "def f(x):\n    return x * 2\n",
    "The quick brown fox jumps over the lazy dog.",
]
TEXTS = [
    "rev:abcdefg=gfedcba",
    "import os\nprint(os.getcwd())",
    "47+68=115",
    "sort:qwerty=eqrtwy",
    "a much longer line of text, longer than the sliding window of eight tokens",
    "x",
]

COMMON = dict(
    vocab_size=100,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def build(name):
    import torch
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, AutoModelForCausalLM

    if name == "mistral":
        config = MistralConfig(**COMMON, num_attention_heads=4, num_key_value_heads=1, sliding_window=8,
                               rope_theta=10000.0, tie_word_embeddings=False)
    elif name == "qwen2":
        config = Qwen2Config(**COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=1000000.0,
                             tie_word_embeddings=True, use_sliding_window=False)
    else:
        config = LlamaConfig(**COMMON, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             tie_word_embeddings=False,
                             rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 16,
                                           "rope_theta": 500000.0})
    torch.manual_seed(sum(map(ord, name)))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)  # larger than the default init, so attention is far from uniform
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    d = os.path.join(OUT, name)
    shutil.rmtree(d, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(d)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(TOKENIZER, f), d)
    return d


def reference(d):
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
    tok = Tokenizer.from_file(os.path.join(d, "tokenizer.json"))
    out = {}
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([tok.encode(p).ids])
            out[f"p{i}/input_ids"] = ids[0].clone()
            out[f"p{i}/logits"] = model(ids).logits[0].float().contiguous()
        sums, hooks = {}, []
        for mname, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                def hook(mod, inp, _out, mname=mname):
                    x = inp[0].detach().double().reshape(-1, inp[0].shape[-1])
                    sums[mname] = sums.get(mname, 0) + (x * x).sum(0)
                hooks.append(m.register_forward_hook(hook))
        n = 0
        with open(os.path.join(d, "calib.jsonl"), "w") as f:
            for t in TEXTS:
                f.write(json.dumps({"text": t}) + "\n")
                ids = torch.tensor([tok.encode(t).ids])
                n += ids.shape[1]
                model(ids)
        for h in hooks:
            h.remove()
    for mname, s in sums.items():
        out[mname] = s.float().contiguous()
    out["n_tokens"] = torch.tensor([n], dtype=torch.int64)
    meta = {f"p{i}": p for i, p in enumerate(PROMPTS)}
    import transformers
    meta["note"] = f"transformers {transformers.__version__}, torch {torch.__version__}: float32 CPU eager forward of the bf16 weights"
    save_file(out, os.path.join(d, "reference.safetensors"), metadata=meta)


def main():
    ensure_venv()
    for name in ("mistral", "qwen2", "llama3"):
        reference(build(name))
        print("wrote", os.path.join(OUT, name))


if __name__ == "__main__":
    main()
