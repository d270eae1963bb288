"""Writes the tiny checkpoints under tests/recipes/models/ that the checker's
fixture recipes compare against the demo base (examples/demo/base). Only the
headers matter to `obim check`; tensor data is zeros. Standard library only.

    python3 tools/make_test_models.py
"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(__file__), "..", "tests", "recipes", "models")


def write(name, arch, tensors, truncate=False):
    d = os.path.join(ROOT, name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"architectures": [arch], "model_type": arch.lower().replace("forcausallm", "")}, f, indent=1)
    header, offset = {}, 0
    for tname, shape in tensors:
        n = 2
        for s in shape:
            n *= s
        header[tname] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    data = bytes(offset)
    if truncate:
        data = data[: offset // 2]
    with open(os.path.join(d, "model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


# Vocabulary of 101 instead of 100, and every other tensor missing.
write("mismatch", "LlamaForCausalLM", [("model.embed_tokens.weight", [101, 96])])
# Another architecture.
write("qwen", "Qwen2ForCausalLM", [("model.embed_tokens.weight", [100, 96])])
# Half of the data section is missing.
write("truncated", "LlamaForCausalLM", [("model.embed_tokens.weight", [100, 96])], truncate=True)
# An architecture obim has no forward pass for (so `using` data cannot calibrate it).
write("neox", "GPTNeoXForCausalLM", [("gpt_neox.embed_in.weight", [100, 96]), ("gpt_neox.layers.0.attention.dense.weight", [96, 96])])
