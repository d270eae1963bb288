#!/usr/bin/env python3
"""Writes tests/goldens/regmean/: a float64 reference RegMean merge (Jin et al.
2022, "Dataless Knowledge Fusion by Merging Weights of Language Models") of the
demo family (base examples/demo/base; experts expert_add, expert_reverse,
expert_sort), for checking obim's RegMean against.

    .venv-archs/bin/python tools/regmean_reference.py
    # any python with torch, transformers and safetensors; tools/make_arch_refs.py
    # makes .venv-archs with exactly those (pip install torch transformers safetensors)

What it computes (everything on CPU, deterministic; rerunning gives the same files):

1. Gram matrices, per expert k. Calibration texts: the "text" field of every
   line of examples/demo/data/<task>/calib.jsonl (all 128, file order), task =
   add / reverse / sort for expert_add / expert_reverse / expert_sort. Each text
   is tokenized on its own with the expert's own tokenizer as
   AutoTokenizer.from_pretrained(expert_dir)(text)["input_ids"] (this tokenizer
   prepends <bos> = id 1 and appends nothing), truncated to the first 512 tokens,
   no padding, batch size 1. The expert is loaded with
   AutoModelForCausalLM.from_pretrained(dir, dtype=torch.float32,
   attn_implementation="eager") (bf16 weights upcast), eval(), no_grad. A
   forward pre-hook on every torch.nn.Linear (q/k/v/o_proj, gate/up/down_proj,
   lm_head) accumulates G = sum_t x_t x_t^T over every token position of every
   text, x = the module's input (float32 activations cast to float64, summed in
   float64). Keyed by module name ("model.layers.0.self_attn.q_proj", "lm_head").

2. Merge, in float64, for every tensor of the base's state dict: theta_B = the
   base tensor (bf16 file -> float64), delta_k = theta_k - theta_B.
   * Linear weight W [out, in] with Gram matrices:
       Gt_k   = alpha * G_k + (1 - alpha) * diag(G_k)   (off-diagonal scaled by
                alpha, diagonal kept)
       merged = theta_B + lambda * (sum_k delta_k Gt_k) (sum_k Gt_k)^-1
     via torch.linalg.solve((sum_k Gt_k), (sum_k delta_k Gt_k)^T)^T (the system
     matrix is symmetric).
   * every other tensor (embed_tokens, the RMSNorm weights):
       merged = theta_B + lambda * mean_k delta_k
   Done for (alpha 0.9, lambda 1.0) and (alpha 0.0, lambda 1.0).

3. Files (each checked to be under 1 MiB):
   merged_alpha0.9.safetensors  float32 merged tensors (alpha 0.9, lambda 1):
       layer-0 q/k/o_proj, up/down_proj, layer-1 v_proj, lm_head,
       embed_tokens, layer-0 input_layernorm
   merged_alpha0.0.safetensors  float32 (alpha 0, lambda 1): layer-0 q_proj,
       layer-1 down_proj, lm_head
   gram_add.safetensors  float32 Gram matrices of expert_add for
       model.layers.0.self_attn.q_proj and model.layers.0.mlp.down_proj, plus
       int64 n_tokens [1] (expert_add's total token count)
   README.md  these definitions, the versions used, token counts, the
       condition numbers of sum_k Gt_k (alpha 0.9) for the saved Linear weights
       and how far the same merge done in float32 lands from the reference.
   Each .safetensors has one metadata key, "regmean_reference", a sorted JSON
   object (alpha, lambda, base, experts / expert, calib, script).

Self-checks (assertions): RegMean with identical deltas returns theta_B + delta
(synthetic case, alpha 0 and 0.9); at alpha 0 every column j of the merged delta
is sum_k delta_k[:, j] G_k[j, j] / sum_k G_k[j, j] (checked on real layers);
the model's float32 parameters equal the bf16 file upcast; all merged tensors
are finite.
"""
import json
import os

import safetensors
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEMO = os.path.join(ROOT, "examples", "demo")
OUT = os.path.join(ROOT, "tests", "goldens", "regmean")
BASE = "base"
EXPERTS = [("expert_add", "add"), ("expert_reverse", "reverse"), ("expert_sort", "sort")]
MAX_TOKENS = 512
MAX_FILE = 1 << 20  # 1 MiB

SAVE_09 = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.k_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.1.self_attn.v_proj.weight",
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.layers.0.input_layernorm.weight",
]
SAVE_00 = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "lm_head.weight",
]
GRAM_SAVE = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"]


def load_model(d):
    return AutoModelForCausalLM.from_pretrained(
        d, dtype=torch.float32, attn_implementation="eager").eval()


def load_f64(d):
    """The checkpoint's tensors (bf16 on disk) as float64."""
    return {k: v.to(torch.float64) for k, v in load_file(os.path.join(d, "model.safetensors")).items()}


def grams(expert_dir, task):
    """Per-Linear Gram matrices sum_t x_t x_t^T (float64) and the token count."""
    model = load_model(expert_dir)
    tok = AutoTokenizer.from_pretrained(expert_dir)
    # the float32 model is exactly the bf16 file upcast
    disk = load_file(os.path.join(expert_dir, "model.safetensors"))
    sd = model.state_dict()
    assert set(sd) == set(disk), (set(sd) ^ set(disk))
    for k, v in disk.items():
        assert torch.equal(sd[k], v.to(torch.float32)), k

    g = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def pre(m, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
                if name in g:
                    g[name] += x.T @ x
                else:
                    g[name] = x.T @ x
            hooks.append(mod.register_forward_pre_hook(pre))
    texts = [json.loads(l)["text"] for l in open(os.path.join(DEMO, "data", task, "calib.jsonl"))]
    assert len(texts) == 128, len(texts)
    n = 0
    bos_first = True
    with torch.no_grad():
        for t in texts:
            ids = tok(t)["input_ids"][:MAX_TOKENS]
            bos_first &= ids[0] == tok.bos_token_id
            n += len(ids)
            model(torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return g, n, {"texts": len(texts), "bos_first": bool(bos_first), "bos_token_id": tok.bos_token_id}


def regmean_linear(theta_b, thetas, gs, alpha, lam):
    """theta_B + lam * (sum_k delta_k Gt_k)(sum_k Gt_k)^-1 and sum_k Gt_k, float64."""
    num = torch.zeros_like(theta_b)
    den = torch.zeros_like(gs[0])
    for th, g in zip(thetas, gs):
        gt = alpha * g + (1.0 - alpha) * torch.diag(torch.diagonal(g))
        num += (th - theta_b) @ gt
        den += gt
    x = torch.linalg.solve(den, num.T).T
    return theta_b + lam * x, den


def regmean(base, experts, expert_grams, alpha, lam):
    merged, dens = {}, {}
    for name, tb in base.items():
        thetas = [e[name] for e in experts]
        mod = name[: -len(".weight")] if name.endswith(".weight") else None
        if tb.dim() == 2 and mod is not None and all(mod in g for g in expert_grams):
            merged[name], dens[name] = regmean_linear(tb, thetas, [g[mod] for g in expert_grams], alpha, lam)
        else:
            merged[name] = tb + lam * torch.stack([t - tb for t in thetas]).mean(0)
    return merged, dens


def self_test():
    gen = torch.Generator().manual_seed(0)
    tb = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    delta = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    gs = []
    for _ in range(3):
        a = torch.randn(20, 7, generator=gen, dtype=torch.float64)
        gs.append(a.T @ a)
    for alpha in (0.0, 0.9):
        m, _ = regmean_linear(tb, [tb + delta] * 3, gs, alpha, 1.0)
        assert torch.allclose(m, tb + delta, rtol=0, atol=1e-12), (alpha, (m - tb - delta).abs().max())
    # alpha 0, lambda 0.5: diagonal-weighted average of the deltas, halved
    ds = [torch.randn(5, 7, generator=gen, dtype=torch.float64) for _ in range(3)]
    m, _ = regmean_linear(tb, [tb + d for d in ds], gs, 0.0, 0.5)
    w = torch.stack([torch.diagonal(g) for g in gs])  # [k, in]
    want = tb + 0.5 * sum(d * w[i] for i, d in enumerate(ds)) / w.sum(0)
    assert torch.allclose(m, want, rtol=0, atol=1e-12)


def save(path, tensors, metadata):
    # one metadata key holding sorted JSON: safetensors writes a multi-key
    # metadata map in random order, which would make reruns differ byte-wise
    save_file(tensors, path, metadata={"regmean_reference": json.dumps(metadata, sort_keys=True)})
    size = os.path.getsize(path)
    assert size < MAX_FILE, (path, size)
    return size


def main():
    self_test()
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, safetensors {safetensors.__version__}")
    base = load_f64(os.path.join(DEMO, BASE))
    base_sd = load_model(os.path.join(DEMO, BASE)).state_dict()
    assert set(base_sd) == set(base)
    experts, expert_grams, counts, tokinfo = [], [], {}, {}
    for e, task in EXPERTS:
        d = os.path.join(DEMO, e)
        experts.append(load_f64(d))
        assert set(experts[-1]) == set(base), e
        g, n, info = grams(d, task)
        expert_grams.append(g)
        counts[e] = n
        tokinfo[e] = info
        print(f"{e}: {n} tokens over {info['texts']} texts of data/{task}/calib.jsonl "
              f"(bos first: {info['bos_first']}), {len(g)} Linear Gram matrices")
    linears = sorted(expert_grams[0])
    tied = "lm_head.weight" not in base
    tie_cfg = json.load(open(os.path.join(DEMO, BASE, "config.json"))).get("tie_word_embeddings", True)

    results = {}
    for alpha in (0.9, 0.0):
        merged, dens = regmean(base, experts, expert_grams, alpha, 1.0)
        for k, v in merged.items():
            assert torch.isfinite(v).all(), (alpha, k)
        results[alpha] = (merged, dens)
    # alpha 0 on real layers: column-wise diagonal-weighted average
    m0 = results[0.0][0]
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"]:
        mod = name[: -len(".weight")]
        w = torch.stack([torch.diagonal(g[mod]) for g in expert_grams])
        want = base[name] + sum((e[name] - base[name]) * w[i] for i, e in enumerate(experts)) / w.sum(0)
        err = ((m0[name] - want).abs().max() / want.abs().max()).item()
        assert err < 1e-10, (name, err)

    conds = {}
    for name in SAVE_09:
        if name in results[0.9][1]:
            conds[name] = torch.linalg.cond(results[0.9][1][name]).item()
            print(f"cond(sum Gt) alpha 0.9  {name}: {conds[name]:.6e}")

    # how far a float32 implementation (float32 Grams, float32 solve) lands from
    # this float64 reference: a guide for test tolerances
    f32_err = {}
    for name in SAVE_09:
        mod = name[: -len(".weight")]
        if name not in results[0.9][1]:
            continue
        tb = base[name].float()
        num, den = torch.zeros_like(tb), torch.zeros(expert_grams[0][mod].shape)
        for e, g in zip(experts, expert_grams):
            g = g[mod].float()
            gt = 0.9 * g + 0.1 * torch.diag(torch.diagonal(g))
            num += (e[name].float() - tb) @ gt
            den += gt
        m32 = tb + torch.linalg.solve(den, num.T).T
        f32_err[name] = (m32.double() - results[0.9][0][name]).abs().max().item()
        print(f"float32 path vs reference, alpha 0.9  {name}: max abs {f32_err[name]:.2e}")

    os.makedirs(OUT, exist_ok=True)
    meta_common = {"base": "examples/demo/base", "experts": ",".join(e for e, _ in EXPERTS),
                   "lambda": "1.0", "script": "tools/regmean_reference.py"}
    sizes = {}
    for alpha, names, fname in [(0.9, SAVE_09, "merged_alpha0.9.safetensors"),
                                (0.0, SAVE_00, "merged_alpha0.0.safetensors")]:
        t = {n: results[alpha][0][n].to(torch.float32).contiguous() for n in names}
        sizes[fname] = save(os.path.join(OUT, fname), t, dict(meta_common, alpha=str(alpha)))
    gram_t = {n: expert_grams[0][n].to(torch.float32).contiguous() for n in GRAM_SAVE}
    gram_t["n_tokens"] = torch.tensor([counts["expert_add"]], dtype=torch.int64)
    sizes["gram_add.safetensors"] = save(os.path.join(OUT, "gram_add.safetensors"), gram_t,
                                         {"expert": "examples/demo/expert_add",
                                          "calib": "examples/demo/data/add/calib.jsonl",
                                          "script": "tools/regmean_reference.py"})

    shapes = {n: list(base[n].shape) for n in sorted(set(SAVE_09) | set(SAVE_00))}
    readme = f"""# RegMean reference (tests/goldens/regmean/)

Made by `tools/regmean_reference.py` (its docstring has the same definitions):

    .venv-archs/bin/python tools/regmean_reference.py

with torch {torch.__version__}, transformers {transformers.__version__},
safetensors {safetensors.__version__}, Python on CPU. Rerunning rewrites these
files identically.

RegMean (Jin et al. 2022, "Dataless Knowledge Fusion by Merging Weights of
Language Models") of the demo family: base `examples/demo/base`, experts
`examples/demo/expert_add`, `expert_reverse`, `expert_sort` (4-layer Llama,
hidden 96, intermediate 256, vocab 100, bf16 safetensors;
`tie_word_embeddings: {str(tie_cfg).lower()}` in config.json and `lm_head.weight`
{'absent from' if tied else 'stored in'} the checkpoint{'' if tied else ', so lm_head is merged as its own Linear with its own Gram matrix'}).

## Gram matrices

Per expert k, calibration texts = the `"text"` field of every line of
`examples/demo/data/<task>/calib.jsonl` (all 128, file order; task add /
reverse / sort for expert_add / expert_reverse / expert_sort). Each text is
tokenized on its own with that expert's own tokenizer,
`AutoTokenizer.from_pretrained(expert_dir)(text)["input_ids"]`, which
prepends `<bos>` (id 1) and appends nothing (no `<eos>`); truncated to the
first {MAX_TOKENS} tokens (none is that long), no padding, batch size 1.
The expert is loaded with `AutoModelForCausalLM.from_pretrained(dir,
dtype=torch.float32, attn_implementation="eager")` (bf16 weights upcast
exactly), `eval()`, `torch.no_grad()`. A forward pre-hook on every
`torch.nn.Linear` (q/k/v/o_proj, gate/up/down_proj of each layer, and
`lm_head`) accumulates

    G = sum over texts, over every token position t of x_t x_t^T      [in, in]

with x the module's input (float32 activations cast to float64, summed in
float64), keyed by module name (`model.layers.0.self_attn.q_proj`,
`lm_head`). The `lm_head` input is the final-RMSNorm output.

Total tokens (BOS included):

| expert | texts | tokens |
| --- | --- | --- |
""" + "".join(f"| {e} | {tokinfo[e]['texts']} | {counts[e]} |\n" for e, _ in EXPERTS) + f"""
## Merge (float64)

For every tensor of the base's state dict (= its safetensors keys):
theta_B = base tensor (bf16 -> float64), theta_k = expert k's,
delta_k = theta_k - theta_B.

* Linear weight W [out, in] (all 28 layer linears and lm_head):

      Gt_k   = alpha * G_k + (1 - alpha) * diag(G_k)   # off-diagonal x alpha, diagonal kept
      merged = theta_B + lambda * (sum_k delta_k Gt_k) (sum_k Gt_k)^-1

  computed as `torch.linalg.solve(S, N.T).T` with S = sum_k Gt_k (symmetric)
  and N = sum_k delta_k Gt_k. With lambda = 1 this equals the paper's
  (sum_k theta_k Gt_k)(sum_k Gt_k)^-1.
* every other tensor (`model.embed_tokens.weight`, `model.norm.weight`, the
  input/post_attention layernorms): `merged = theta_B + lambda * mean_k delta_k`.

Saved as float32 (rounded from the float64 result):

| file | alpha | lambda | tensors |
| --- | --- | --- | --- |
| `merged_alpha0.9.safetensors` ({sizes['merged_alpha0.9.safetensors']} B) | 0.9 | 1.0 | {', '.join(f'`{n}` {shapes[n]}' for n in SAVE_09)} |
| `merged_alpha0.0.safetensors` ({sizes['merged_alpha0.0.safetensors']} B) | 0.0 | 1.0 | {', '.join(f'`{n}` {shapes[n]}' for n in SAVE_00)} |
| `gram_add.safetensors` ({sizes['gram_add.safetensors']} B) | - | - | expert_add's G for {', '.join(f'`{n}`' for n in GRAM_SAVE)} (float32), `n_tokens` int64 [1] = {counts['expert_add']} |

Condition numbers (`torch.linalg.cond`, 2-norm) of S = sum_k Gt_k at alpha 0.9
for the saved Linear weights (q/k/v_proj of a layer share one input, hence
one S; so do gate/up_proj), and, as a guide for tolerances, the max abs
difference from this reference of the same merge done in float32 (float32
Grams, float32 `torch.linalg.solve`; the script computes it each run):

| tensor | cond(S) | float32 path, max abs diff |
| --- | --- | --- |
""" + "".join(f"| `{n}` | {c:.4e} | {f32_err[n]:.1e} |\n" for n, c in conds.items()) + """
Checks the script asserts: identical deltas give theta_B + delta (synthetic,
alpha 0 and 0.9); at alpha 0 each column j of the merged delta equals
sum_k delta_k[:, j] G_k[j, j] / sum_k G_k[j, j] (checked on real layers); the
float32 model parameters equal the bf16 file upcast; every merged tensor is
finite.
"""
    with open(os.path.join(OUT, "README.md"), "w") as f:
        f.write(readme)
    for fname in sorted(os.listdir(OUT)):
        print(f"{fname}: {os.path.getsize(os.path.join(OUT, fname))} bytes")


if __name__ == "__main__":
    main()
