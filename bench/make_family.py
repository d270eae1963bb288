#!/usr/bin/env python3
"""Writes a Llama-shaped random family for the merge benchmark: a base and
three experts (base + small noise), bf16, sharded like a real checkpoint
(1 GB shards with an index), with config.json. Needs torch and safetensors.

    python3 bench/make_family.py DIR [--hidden 1536 --intermediate 4608 --layers 26 --vocab 32000]
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

p = argparse.ArgumentParser()
p.add_argument("dir")
p.add_argument("--hidden", type=int, default=1536)
p.add_argument("--intermediate", type=int, default=4608)
p.add_argument("--layers", type=int, default=26)
p.add_argument("--vocab", type=int, default=32000)
p.add_argument("--heads", type=int, default=12)
p.add_argument("--kv-heads", type=int, default=4)
p.add_argument("--shard-bytes", type=int, default=1_000_000_000)
a = p.parse_args()

head_dim = a.hidden // a.heads
shapes = {"model.embed_tokens.weight": [a.vocab, a.hidden]}
for l in range(a.layers):
    pre = f"model.layers.{l}."
    shapes[pre + "input_layernorm.weight"] = [a.hidden]
    shapes[pre + "self_attn.q_proj.weight"] = [a.hidden, a.hidden]
    shapes[pre + "self_attn.k_proj.weight"] = [a.kv_heads * head_dim, a.hidden]
    shapes[pre + "self_attn.v_proj.weight"] = [a.kv_heads * head_dim, a.hidden]
    shapes[pre + "self_attn.o_proj.weight"] = [a.hidden, a.hidden]
    shapes[pre + "post_attention_layernorm.weight"] = [a.hidden]
    shapes[pre + "mlp.gate_proj.weight"] = [a.intermediate, a.hidden]
    shapes[pre + "mlp.up_proj.weight"] = [a.intermediate, a.hidden]
    shapes[pre + "mlp.down_proj.weight"] = [a.hidden, a.intermediate]
shapes["model.norm.weight"] = [a.hidden]
shapes["lm_head.weight"] = [a.vocab, a.hidden]
n_params = sum(torch.Size(s).numel() for s in shapes.values())
config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": a.hidden,
    "intermediate_size": a.intermediate, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
    "num_key_value_heads": a.kv_heads, "vocab_size": a.vocab, "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
    "dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
}


def write(name, tensors):
    d = os.path.join(a.dir, name)
    os.makedirs(d, exist_ok=True)
    shards, current, size = [], {}, 0
    for k, t in tensors.items():
        b = t.numel() * 2
        if current and size + b > a.shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[k] = t
        size += b
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(d, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * 2 for t in tensors.values())
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, open(os.path.join(d, "model.safetensors.index.json"), "w"), indent=1)
    json.dump(config, open(os.path.join(d, "config.json"), "w"), indent=1)


g = torch.Generator().manual_seed(0)
base = {k: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}
write("base", base)
for i, name in enumerate(["expert_a", "expert_b", "expert_c"]):
    write(name, {k: (t.float() + torch.randn(t.shape, generator=g) * 0.002 * (i + 1)).to(torch.bfloat16) for k, t in base.items()})
print(f"{n_params:,} parameters per model in {a.dir}")
