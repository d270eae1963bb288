//! Every diagnostic code obim emits, with its one-line title and the long
//! explanation `obim explain CODE` prints. Severity follows the letter:
//! `E` errors, `W` warnings, `N` notes.

macro_rules! codes {
    ($($code:ident => $title:literal, $explanation:literal;)*) => {
        /// A diagnostic code.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Code { $($code,)* }

        impl Code {
            pub const ALL: &'static [Code] = &[$(Code::$code,)*];
            pub fn as_str(self) -> &'static str {
                match self { $(Code::$code => stringify!($code),)* }
            }
            pub fn title(self) -> &'static str {
                match self { $(Code::$code => $title,)* }
            }
            pub fn explanation(self) -> &'static str {
                match self { $(Code::$code => $explanation,)* }
            }
        }
    };
}

impl Code {
    /// Problems with a checkpoint rather than with the recipe: `obim run`
    /// exits 3 (failure while running) when these are the only errors.
    pub fn is_checkpoint_problem(self) -> bool {
        matches!(
            self,
            Code::E0021
                | Code::E0022
                | Code::E0023
                | Code::E0024
                | Code::E0025
                | Code::E0029
                | Code::E0034
        )
    }

    pub fn parse(text: &str) -> Option<Code> {
        let text = text.trim().to_ascii_uppercase();
        Code::ALL.iter().copied().find(|c| c.as_str() == text)
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

codes! {
E0001 => "syntax error", r#"The recipe does not follow the grammar of `.obim` files.

The message lists what the parser expected at the point where it stopped.
Each top-level item (`import`, `let`, `base`, `model`, `data`, `merge`,
`stage`, `output`) is parsed on its own, so one run shows the syntax errors of
every item; names are only checked once the file parses.

    merge m = obim(base: llama {        # error: expected `,` or `)`
        math retain 0.4 using gsm8k
    }

Fix: close the parameter list: `obim(base: llama) {`."#;

E0002 => "unknown name", r#"A name is used that no definition, `let`, import or stage argument provides.

Names are defined by `base`, `model`, `data`, `merge`, `stage` and `let`, by
`import "std/..."` (all its names) and by `import "./file.obim" as m` (its
names as `m.NAME`). The help line suggests the closest defined name.

    model math = "./math"
    merge m = task_arithmetic(base: llama) { mth weight 1.0 }   # error: `mth`

Fix: correct the spelling, or define the name."#;

E0003 => "duplicate definition", r#"Two definitions in one file have the same name.

Every `base`, `model`, `data`, `merge`, `stage` and `let` shares one namespace,
so a model and a data source may not have the same name either.

    model math = "./a"
    data  math = jsonl("math.jsonl")    # error: `math` is already a model

Fix: rename one of them."#;

E0004 => "wrong kind of name", r#"A name refers to the wrong kind of thing.

Merge inputs, `base:`, `order`, `take` and an output's merge name models or
merges; `using` names a `data` source; numbers and strings may come from a
`let`.

    data gsm8k = jsonl("gsm8k.jsonl")
    merge m = obim(base: llama) { gsm8k retain 0.4 }   # error: data, not a model

Fix: use a name of the kind the position needs."#;

E0005 => "unknown merge method", r#"The method of a `merge` is neither a built-in method nor a `stage`.

Built-in methods: `obim`, `task_arithmetic`, `ties`, `dare_ties`,
`dare_linear`, `linear`, `slerp`. A `stage` defined in the recipe or an
imported module can be used as a method too.

    merge m = tie(base: llama) { a weight 1.0 }    # error: did you mean `ties`?
"#;

E0006 => "unknown parameter, setting or option", r#"A parameter, per-model setting or option that the method or declaration does
not know.

Method parameters follow mergekit's names (`normalize`, `rescale`, `lambda`,
`int8_mask`, `t`, `density`, `weight`); obim adds `retain`, `using`, `seed`.
`data` options are `field`, `samples`, `seq_len`, `seed`; `output` options are
`dtype`, `shard_size`, `tokenizer`.

    merge m = ties(base: llama, denisty: 0.5) { ... }   # error: did you mean `density`?
"#;

E0007 => "missing parameter", r#"A parameter the method needs is not given, neither in the merge's parameter
list (which sets a default for every input) nor on the input itself.

`obim` needs `base:` and a `retain` for every input; `task_arithmetic`, `ties`,
`dare_*` and `linear` need a `weight` for every input; `slerp` needs `base:`
and `t:`.

    merge m = ties(base: llama) { math  code weight 1.0 }   # error: `math` has no weight

Fix: `math weight 1.0`, or `ties(base: llama, weight: 1.0)` for all inputs."#;

E0008 => "wrong type", r#"A value has the wrong type: a string where a number is needed, a number
where a model is needed, a word that is not one of the allowed ones.

    data d = jsonl("x.jsonl") { samples "128" }     # error: expected a number
    output m -> "out" { dtype float8 }              # error: expected bf16, f16 or f32
"#;

E0009 => "value out of range", r#"A number is outside the range the parameter accepts.

`retain` and `density` are fractions in (0, 1]; `t` is in [0, 1]; `samples`,
`seq_len` are positive integers; `seed` a non-negative integer.

    math retain 1.4     # error: retain must be in (0, 1]
"#;

E0010 => "model used twice in one merge", r#"The same model (or merge) appears twice among the inputs of one merge, or
is both the merge's base and one of its inputs. Each input contributes one
task vector; listing it twice would double-count it silently.

    merge m = ties(base: llama) { math weight 1  math weight 0.5 }   # error

Fix: list each input once, with the combined weight."#;

E0011 => "`obd` saliency needs calibration data", r#"An `obim` input uses `obd` saliency (the default) on some tensors but has no
`using DATA`. OBD saliency weighs each delta by the input activations of the
expert on its own calibration data, so every input needs a data source.

    merge m = obim(base: llama) { math retain 0.45 }    # error: no `using`

Fix: `math retain 0.45 using gsm8k`, or `saliency magnitude`."#;

E0012 => "invalid order", r#"An `order` names a model that is not an input of the merge, names one twice,
or leaves some input out. An order must be a permutation of the merge's
inputs (or `rotate`, or `X first`).

    merge m = obim(base: b) { x retain 0.3 using d  y retain 0.3 using d
        order [x, z] }       # error: `z` is not an input, `y` is missing
"#;

E0013 => "retention ratios sum to more than 1", r#"In an `obim` merge the retention ratios of the inputs sum to more than 1.

OBIM gives every position of a tensor to at most one input, in order: the
first input takes round(n₁·N) positions, the second round(n₂·N) of those left,
and so on. With Σ nₖ > 1 the last inputs in the order get fewer positions than
asked, or none; the OBIM paper (arXiv 2502.12217) reports a catastrophic drop
in exactly this setting. With `order rotate` the input cut short changes from
layer to layer.

    chat retain 0.6 using a
    math retain 0.5 using b      # error: 0.6 + 0.5 = 1.1 > 1

Fix: lower the ratios so that their sum is at most 1 (the paper uses 0.40,
0.45 and 0.10 for chat, math and code)."#;

E0014 => "cycle", r#"Merges (or `let` values) depend on each other in a cycle, so none of them
can be computed first. The message names the whole cycle.

    merge a = linear { b weight 1.0  m weight 1.0 }
    merge b = linear { a weight 1.0  m weight 1.0 }    # error: a → b → a
"#;

E0015 => "import cycle", r#"Recipe files import each other in a cycle. The message names every file of
the cycle, in import order.

    # a.obim
    import "./b.obim" as b
    # b.obim
    import "./a.obim" as a     # error: a.obim → b.obim → a.obim
"#;

E0016 => "import not found", r#"An import names a stdlib module that does not exist, or a file that cannot
be read. `std/...` names a module shipped inside obim (`obim explain E0016`
lists them below); anything else is a path relative to the importing file.

Stdlib modules: std/paper, std/llama, std/mistral, std/qwen2, std/stages."#;

E0017 => "outputs collide", r#"Two outputs write to the same directory, or one output directory lies inside
another. The second would overwrite the first.

    output a -> "out/m"
    output b -> "out/m"     # error
"#;

E0018 => "invalid layer pattern", r#"A `layers` pattern is not a valid glob. Patterns match whole tensor names:
`*` matches any run of characters (dots included), `?` one character,
`{a..b}` an integer from a to b inclusive, `{x,y}` one of the alternatives.

    layers "model.layers.{5..2}.*" { take base }    # error: empty range
"#;

E0019 => "setting not used by this method", r#"A setting is given to a method that has no use for it: `retain` or `using`
outside `obim`, `weight` in `obim`, `order`, `saliency` or `take` outside
`obim` (`take` also works in other methods), and so on. It would be ignored, so
it is an error.

    merge m = ties(base: llama) { math retain 0.4 }   # error: ties has no `retain`
"#;

E0020 => "wrong number of inputs", r#"A merge has no inputs, or a method that needs a fixed number of inputs gets
another number: `slerp` interpolates between its base and exactly one other
model.

    merge s = slerp(base: a, t: 0.5) { b  c }    # error: slerp takes one input
"#;

E0021 => "model not found", r#"A local model directory does not exist, or has no safetensors weights.

A model source that starts with `./`, `../`, `/` or `~`, or that names an
existing directory, is a local directory resolved relative to the recipe. Any
other `org/name` is a Hugging Face id, looked up in the local Hugging Face
cache (`HF_HUB_CACHE`, `HF_HOME/hub`, or `~/.cache/huggingface/hub`)."#;

E0022 => "unreadable checkpoint", r#"A model's `config.json`, `model.safetensors.index.json` or a safetensors
header could not be read: bad JSON, a header longer than the file, offsets out
of range or overlapping, a byte length that does not match dtype × shape, an
unsupported dtype, or a shard named in the index that does not exist. The
message names the file and, where there is one, the tensor."#;

E0023 => "architecture mismatch", r#"An input model's architecture (`architectures` in config.json) differs from
the base's. Task vectors between different architectures are meaningless.

Fix: merge only fine-tunes of the same base."#;

E0024 => "missing tensor", r#"An input model lacks tensors the base has. Every tensor of the output is
computed from the base and every input, so all of them must be present."#;

E0025 => "shape mismatch", r#"A tensor of an input model has another shape than the base's. A different
vocabulary size (an added token) shows up here on `embed_tokens` and
`lm_head`: obim does not yet resize vocabularies (mergekit's
`tokenizer_source` is out of scope for now)."#;

E0026 => "data source not found", r#"A `data` source's file does not exist, or its glob matches no file. Paths
and globs resolve relative to the recipe.

    data code = text("data/code/*.py")    # error when no file matches
"#;

E0027 => "`take` names a model outside the merge", r#"`take MODEL` copies tensors from MODEL unchanged; MODEL must be the merge's
base (`take base`) or one of its inputs."#;

E0028 => "output would overwrite an input", r#"An output directory is the directory of one of the recipe's models (or lies
inside it, or contains it). Writing it would destroy an input."#;

E0029 => "unusable data source", r#"A `data` source's files exist but give no calibration text: a line that is
not JSON, a line without the `field` (default `text`) or where it is not a
string, or no text at all (an empty file, text files with only blank lines).

    data calib = jsonl("calib.jsonl") { field "content" }   # lines have `text`

The message names the file and the line. `obim check` reads every data source
of the recipe once, so this is caught before any model is loaded."#;

E0030 => "no forward pass for this architecture", r#"An input uses `obd` saliency, which needs forward passes of the model on its
calibration data, but obim has no forward pass for its architecture (or its
config.json lacks a field the forward pass needs). obim runs
LlamaForCausalLM (Llama 2/3, rope scaling `llama3` and `linear`),
MistralForCausalLM and Qwen2ForCausalLM. Use `saliency magnitude` for this
merge, or for this input's tensors with a `layers` rule."#;

E0031 => "invalid `auto` candidates", r#"An `auto` gives no candidate, or its range cannot be walked:

    lambda: auto []                   # no candidates
    retain auto 0.1..0.5 step 0       # a step of 0
    retain auto 0.5..0.1 step 0.1     # the step moves away from the end

A range `FROM..TO step STEP` starts at FROM and adds STEP while it stays
within TO (inclusive). Each candidate must also be in the parameter's range
(E0009)."#;

E0032 => "`auto` without `select`", r#"A merge gives candidates (`auto`) for a setting but does not say how to
choose among them. Add `select by loss(DATA, ...)`: each candidate is merged
and scored by its mean next-token loss on the named data sources (held-out
data, not the test sets); the lowest wins."#;

E0033 => "too many candidates", r#"The `auto` settings of one merge form a cross product of more than 64
candidates; each is merged and scored, so the cost grows with the product.
Use fewer values or fewer `auto` settings."#;

E0034 => "invalid model config", r#"A model that a merge calibrates (an input with `using` data) has a
`config.json` that cannot describe it: a missing or non-numeric size, zero
attention heads, heads that cannot share the key/value heads, an odd head
dimension, or sizes that disagree with the checkpoint's own tensors (the
embedding is `vocab_size × hidden_size`, the first query projection
`heads × head_dim × hidden_size`). This is a fault of the checkpoint, not of
the recipe, so `obim run` exits 3.

Fix: re-download the model, or correct its `config.json`."#;

E0035 => "per-input setting written with a colon", r#"In a merge body, `MODEL setting value` sets a setting for that input and
`key: value` sets a parameter for the whole merge (the default of every
input). mergekit's YAML puts a colon after every key, so `add weight: 0.3`
is an easy slip: it reads as the input `add` with no settings, then `weight`
for every input. obim refuses it rather than guess.

    merge m = task_arithmetic(base: llama) {
        add weight: 0.3        # error: for every input, or for `add`?
    }

Fix: `add weight 0.3` for the input, or `weight: 0.3` on a line of its own
(or in the parameter list) for every input."#;

E0036 => "pattern matches no tensor", r#"A `layers` pattern matches no tensor of the base (checked when the base's
safetensors headers are readable, and again after a hub model is downloaded,
before anything runs). Such a rule would do nothing, silently: usually a typo
(`model.layer.*` for `model.layers.*`), another architecture's names, or a
mergekit filter written as is (mergekit's `filter: mlp` matches a substring;
an obim pattern matches the whole name, so write `"*mlp*"`). The help line
proposes a pattern that matches.

    layers "mlp" { take base }        # error: did you mean "*mlp*"?"#;

E0037 => "bad gradient", r#"A list of numbers where one number goes is a gradient over the layers, as
in mergekit: `t: [0, 0.5, 1]` is 0 at the first layer, 1 at the last, and
interpolated linearly between (layer i of L is at i / (L − 1) of the list;
tensors outside the layers, such as embeddings, the final norm and the head,
take the first value). Every element must be a number in the parameter's
range; an empty list has no value.

    merge m = slerp(base: a, t: [0, 0.5, 1]) { b }     # a gradient
    merge m = slerp(base: a, t: []) { b }              # error: empty
    merge m = slerp(base: a, t: [0, true]) { b }       # error: not a number

A list after `auto` is something else: candidates, one of which `select`
chooses for the whole merge (`t: auto [0.3, 0.5]`)."#;

E0038 => "della's keep probabilities leave (0, 1)", r#"DELLA keeps each entry with a probability between density − epsilon (the
smallest magnitudes of a row) and density + epsilon (the largest); mergekit
requires both within (0, 1) whenever density < 1, and so does obim.

    merge m = della(base: b) { x weight 1 density 0.1 epsilon 0.15 }   # error: 0.1 − 0.15 ≤ 0

Fix: a smaller `epsilon` (default 0.15), or a density further from 0 and 1."#;

E0039 => "bad slice", r#"`slice` statements build the output's layers from layer ranges of models,
as mergekit's `slices`: each `slice` adds as many layers as its sources'
ranges have, merged with the merge's method (`passthrough` copies its one
source). A range is `[FROM, TO]` with TO excluded, as mergekit's
`layer_range`.

    merge big = passthrough {
        slice a layers [0, 4]
        slice b layers [2, 6]          # 8 layers: a's 0-3, then b's 2-5
    }

Errors: a range that is not whole numbers or is empty; sources of one slice
with different lengths; more or fewer sources than the method takes (besides
the base); a range past the model's last layer; `slice` inside a `layers`
rule; `obim` with slices (not yet).

Embeddings come from the first slice's sources and the final norm and head
from the last slice's, as in mergekit; the output's `config.json` gets the new
`num_hidden_layers` (and per-layer lists such as `layer_types` follow the
layers they came from)."#;

E0040 => "cannot import", r#"`obim import` maps a mergekit config onto a recipe; a part with no `.obim`
form is this error at its YAML line, never dropped silently, and no recipe is
written. What cannot be imported (yet): mergekit-moe and mergekit-evolve
configs, `tokenizer_source: union` and the `tokenizer:` block, `chat_template`,
`modules`, slices with their own `base_model`, `parameters` or
`residual_weight`, a model with different parameters in different slices, LoRA
references (`model+adapter`), filters with glob characters, and parameters or
methods mergekit 0.1.5 does not have either.

    merge_method: della_ties          # error: obim has no merge method `della_ties`
    tokenizer_source: union           # error: no `.obim` form yet

Remove or rewrite the part and import again; `obim explain METHOD` shows what
each method takes."#;

E0041 => "bad LoRA input", r#"`model NAME = lora("DIR", base: MODEL)` is a PEFT LoRA adapter applied to a
declared model: its tensors are MODEL's, with W + s·B·A for every weight the
adapter targets (s = lora_alpha / r, or lora_alpha / √r with `use_rslora`),
computed as each tensor is read, as peft's `merge_and_unload` does. The
adapter is a local directory with `adapter_config.json` and
`adapter_model.safetensors`; its base is a model (not a merge, not another LoRA
model). A LoRA input cannot have `using` calibration data yet.

    model llama = "meta-llama/Llama-3.2-1B"
    model chat = lora("./adapters/chat", base: llama)
    merge m = ties(base: llama) { chat weight 1 density 0.5 }"#;

E0042 => "vocabulary cannot be built", r#"An output with `tokenizer union`, `tokenizer base` or `tokenizer MODEL` gets a
vocabulary built from its merge's models' tokenizers (`tokenizer.json`), and
every model's embedding and head rows are put at their token's id in it, as
mergekit's `tokenizer_source` does. The tokenizer the output starts from (the
base's, or the model's) must be readable; a model whose tokenizer cannot be
read is taken to have the first model's tokens, as mergekit assumes the
base's. A `token ... from MODEL` line needs MODEL among the merge's models and
the token (or id) in its tokenizer.

    output m -> "out/m" { tokenizer union }    # the base needs tokenizer.json

Fix: give the models their tokenizer files (as `save_pretrained` writes
them), or take the row from a model that has the token."#;

E0043 => "bad tokenizer option", r#"An output's tokenizer options say which vocabulary the merged model gets and
what its tokenizer files hold:

    output m -> "out/m" {
        tokenizer union           # or `base`, or a model: the vocabulary
        pad_to_multiple_of 64     # embedding rows padded (mean of the rows)
        chat_template chatml      # or auto, or "{% for m in messages %}..."
        token "<|im_end|>" from chat          # chat's row of that token
        token "<|tool|>" from chat "<eos>"    # chat's row of another token
        token "<pad>" zero force              # zeros, for every model
    }

`token` lines and `pad_to_multiple_of` need `tokenizer union`, `base` or a
model (mergekit's `tokenizer:` block defaults to union; obim asks for it). A
token is given once; `from MODEL ID` takes a whole number; a chat template is
`auto` (the template most models have), a name (alpaca, chatml, exaone,
llama3, mistral) or Jinja text."#;

E0044 => "data cannot be judged by accuracy", r#"`select by accuracy(DATA, ...)` decodes each candidate's answers greedily
and compares them with the data's answers, as `obim eval` does: every data
source it names must be a jsonl file whose every line has `prompt` and
`answer` strings.

    data val = jsonl("val.jsonl")           # {"prompt": "2+2=", "answer": "4"}
    merge m = task_arithmetic(base: b, lambda: auto [0.5, 1.0]) {
        x weight 1
        select by accuracy(val)
    }

Fix: give the source `prompt` and `answer` fields, or judge by `loss(...)`
(any text)."#;

E0101 => "model not available at run time", r#"`obim run` needs every model of the merges it runs on this machine: a local
directory (relative to the recipe file) or a Hugging Face id that is in the
local cache or can be downloaded. `obim check` only notes a hub model it cannot
see (N0001); at run time it is an error.

Fix: correct the path, or download the model first
(`huggingface-cli download ORG/NAME`), or unset `HF_HUB_OFFLINE`."#;

E0102 => "tensor missing at run time", r#"A model lacks a tensor that the merge needs. `obim check` compares every
input's tensor names with its base when the headers are readable (E0024); this
error comes from a model whose headers could not be compared before the run,
or whose files changed since.

Fix: use checkpoints of the same architecture, or restrict the merge with
`layers` rules that `take` the tensor from a model that has it."#;

E0103 => "tensor cannot be merged", r#"A tensor's dtype is not a floating-point type obim merges (bf16, f16, f32),
or the inputs of one tensor have sizes or dtypes that do not fit together.
Quantised checkpoints (int8, fp8, GPTQ, AWQ) cannot be merged.

Fix: use the unquantised checkpoint, or convert it to bf16."#;

E0104 => "checkpoint cannot be read", r#"Reading an input failed while running: a shard could not be opened or mapped,
a tensor's bytes lie outside its file, or a merge materialised in the cache
could not be opened again. The message names the file and the tensor.

Fix: re-download or re-create the checkpoint; for the cache, remove the
directory the message names (`obim run` recomputes it)."#;

E0105 => "output cannot be written", r#"Writing the output failed: the directory could not be created, the disk is
full, or a file could not be renamed into place. The output is written into
a staging directory beside the target and renamed only when complete, so an
existing output is left as it was. A run killed outright (SIGKILL, a crash)
leaves its staging directory `.NAME.obim-partial-PID` beside the output; the
next run into the same output removes it.

Fix: check permissions and free space at the path the message names."#;

E0106 => "output exists", r#"The output directory exists and was not written by this plan. obim never
replaces an output silently.

Fix: pass `--force` to replace it, or choose another path in the `output`
statement (or with `obim run -o DIR`)."#;

E0107 => "merge failed", r#"A tensor could not be merged with its settings, for example a `take` that
names an input the merge does not have for that tensor, or a method that
needs a base and got none. The message names the tensor.

Fix: check the merge's `layers` rules for the tensor named."#;

E0108 => "interrupted", r#"The run was stopped (Ctrl-C, SIGTERM or SIGHUP) between two tensors. Nothing
was written to the output path: the staging directory is removed and an
existing output is left as it was.

Fix: run the recipe again."#;

E0109 => "calibration failed", r#"The activation statistics an `obd` merge needs could not be computed: the
data could not be read or tokenized, the model has no forward pass, a token is
outside the vocabulary, or the cached statistics file is unreadable.

Fix: see the cause in the message; `obim stats MODEL --data FILE -o OUT`
runs the same calibration on its own."#;

E0110 => "selection failed", r#"A merge's `auto` candidates could not be scored: its base is not available,
its architecture has no forward pass, the `select by loss(...)` data has no
text of two tokens or more, or a forward pass failed.

Fix: see the cause in the message; `obim eval MODEL --data FILE --loss`
runs the same scoring on a single model."#;

E0111 => "output is being written by another run", r#"Another `obim run` is writing the same output path right now. Each run holds
a lock on the output while it writes it (the file `.NAME.obim-lock` beside
the output `NAME`), so that two runs never both write it and one silently
replace the other; the second run stops before computing anything. The
message names the output, and the other run's process id when it is known.

The lock belongs to the running process: the kernel releases it when the
process ends, however it ends, so a killed run does not block later ones.

Fix: wait for the other run to finish (then run again: its output may already
be up to date), or write to another path (the `output` statement, or
`obim run -o DIR`). A merge materialised in the cache is locked the same way:
two runs that calibrate the same merge at once wait for nothing, the second
fails; run it again once the first is done."#;

E0112 => "input holds NaN or infinite values", r#"A tensor of an input checkpoint holds NaN or ±∞. Merged, it would spread
into the output silently: every method adds or scales the inputs, and a NaN
stays a NaN. obim checks every value as it decodes it (no extra pass) and
stops, naming the model, the file and the tensor.

Such values come from a diverged fine-tune or a damaged file. Fix: use an
earlier checkpoint of the fine-tune, or re-download the model. To merge it
anyway (rarely what you want), pass `--allow-non-finite` to `obim run`."#;

W0001 => "unused definition", r#"A definition is never used: a model or data source no merge uses, a merge no
output or later merge uses, a `let` or an import nobody reads. Unused models
are still opened by `obim plan`, so it is worth removing them.

Prefix the name with `_` to silence the warning."#;

W0003 => "setting has no effect", r#"A setting is accepted but changes nothing here: `using` data on an input
whose saliency is `magnitude` everywhere, `density` in `task_arithmetic` (it
has no sparsification step), an `order` or `saliency` in a rule that only
matches `take` tensors."#;

W0004 => "`select` without `auto`", r#"A merge has `select by loss(...)` but none of its settings has candidates,
so there is nothing to choose. Give a setting candidates, e.g.
`retain auto [0.2, 0.3]`, or remove the `select`."#;

W0005 => "input has tensors the base lacks", r#"An input checkpoint has tensors its base does not have (an extra head, a
value head, a vision tower). The output has exactly the base's tensors, so
these are left out of the merge; the warning names them so that nothing is
dropped silently.

Fix: nothing, if the extra tensors are not wanted; otherwise merge into a base
that has them."#;

W0006 => "weights that cannot be meant", r#"A merge's weights are legal but almost certainly not what was meant:
every weight 0 (the output is the base, or zeros for `linear`), weights that
sum to 0 in a merge that divides by their sum (`linear`, `ties`, or any with
`normalize: true`: a sum of 0 is replaced by 1, mergekit's rule, so the
division silently does nothing), or a weight far outside what merges use
(|w| > 100: a lost decimal point?).

Fix: correct the weights, or set `normalize: false` when weights that sum to
0 are intended (task-vector differences, for instance)."#;

W0007 => "imported value never applies", r#"In a mergekit config, a parameter given as a list of `filter`/`value` pairs
takes the first pair whose filter is in the tensor's name; a pair without a
filter (or with `*`) matches every tensor, so the pairs after it are never
used. `obim import` leaves them out of the recipe, as mergekit ignores them,
and says so.

    t:
      - filter: self_attn
        value: [0, 1]
      - value: 0.5
      - filter: mlp          # warning: never applies
        value: 0.9

Fix: move the pair above the one without a filter."#;

N0001 => "model not available locally", r#"A model given by Hugging Face id is not in the local Hugging Face cache, so
`obim check` cannot read its config and headers; architecture, tensor and
shape checks against the base are skipped for it. `obim run` downloads it
where the network allows, or run `huggingface-cli download ORG/NAME` first."#;
}
