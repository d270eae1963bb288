//! `auto` candidates chosen by `select by loss(...)` on the demo family
//! (prompt/answer data, so the loss of the answers given the prompts): the
//! winner is pinned, its score equals the loss of the written merge computed
//! by the ordinary whole-model forward, the written merge equals the same
//! merge with the winning value fixed, and scores are cached per candidate.

use crate::common::{demo, obim, temp};
use candle_core::Device;
use obim::checkpoint::open_dir;
use obim::data::{self, Tokenizer};
use obim::eval::Generator;
use std::path::Path;

/// Writes `text` as `dir/r.obim` and runs it with `--force`, caching in
/// `dir/cache`; returns what it printed on stderr.
fn run_forced(dir: &Path, text: &str) -> String {
    std::fs::write(dir.join("r.obim"), text).expect("a writable temporary directory");
    let recipe = dir.join("r.obim");
    let cache = dir.join("cache");
    let out = obim(&[
        "run",
        "--force",
        "--cache",
        cache.to_str().expect("a UTF-8 path"),
        recipe.to_str().expect("a UTF-8 path"),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{stderr}");
    stderr
}

/// The report of the run's output, `dir/out`.
fn report(dir: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(dir.join("out/obim-report.json")).expect("a report");
    serde_json::from_str(&text).expect("a JSON report")
}

fn recipe(lambda: &str) -> String {
    format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel sort = \"{0}/expert_sort\"\n\
         data add_val = jsonl(\"{0}/data/add/calib.jsonl\") {{ samples 24, seed 5 }}\n\
         data sort_val = jsonl(\"{0}/data/sort/calib.jsonl\") {{ samples 24, seed 5 }}\n\
         merge m = task_arithmetic(base: llama, lambda: {lambda}) {{\n    add weight 1.0\n    sort weight 1.0\n    select by loss(add_val, sort_val)\n}}\n\
         output m -> \"out\" {{ dtype f32 }}\n",
        demo().display()
    )
}

#[test]
fn the_lowest_loss_candidate_is_written_and_scores_are_cached() {
    let dir = temp("select");
    let cache = dir.join("cache");
    let run = |text: &str| run_forced(&dir, text);
    let first = run(&recipe("auto [0.2, 1.0, 0.6]"));
    assert!(first.contains("m: chose lambda=1"), "{first}");
    // `obim plan` with the same cache names the candidate the run chose.
    let plan = |cache: &std::path::Path| {
        let out = obim(&[
            "plan",
            "--cache",
            cache.to_str().unwrap(),
            dir.join("r.obim").to_str().unwrap(),
        ]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let shown = plan(&cache);
    assert!(shown.contains("chosen   lambda=1 (loss "), "{shown}");
    assert!(!plan(&dir.join("no-cache")).contains("chosen"));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/obim-report.json")).unwrap())
            .unwrap();
    let selection = &report["selection"]["m"];
    assert_eq!(selection["winner"], 1);
    let candidates = selection["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 3);
    let means: Vec<f64> = candidates
        .iter()
        .map(|c| c["mean"].as_f64().unwrap())
        .collect();
    assert!(means[1] < means[2] && means[2] < means[0], "{means:?}");

    // A candidate's score is the loss of its written (f32) merge, computed
    // by the whole-model forward of `obim eval`.
    let c = obim::compile_file(&dir.join("r.obim")).unwrap();
    let tokenizer = Tokenizer::from_dir(&demo().join("base")).unwrap();
    let scores_its_output = |candidate: usize| {
        let written = open_dir(&dir.join("out")).unwrap();
        let generator = Generator::load(&written, &Device::Cpu).unwrap();
        for (i, source) in c.recipe.data.iter().enumerate() {
            let (_, sequences) = data::judged_sequences(source, &tokenizer).unwrap();
            let losses = generator.losses(&sequences).unwrap();
            let mean = losses.iter().sum::<f64>() / losses.len() as f64;
            let scored = candidates[candidate]["losses"][i][1].as_f64().unwrap();
            assert!(
                (mean - scored).abs() < 1e-4,
                "candidate {candidate}, {}: {mean} vs {scored}",
                source.name
            );
        }
    };
    scores_its_output(1);

    // The same merge with λ fixed at the winner writes the same tensors.
    let chosen = std::fs::read(dir.join("out/model.safetensors")).unwrap();
    let fixed = run(&recipe("1.0"));
    assert!(!fixed.contains("chose"), "{fixed}");
    assert_eq!(
        chosen,
        std::fs::read(dir.join("out/model.safetensors")).unwrap()
    );
    // The candidates share the merge at λ = 1; λ = 0.6 was scored from it.
    run(&recipe("0.6"));
    scores_its_output(2);

    // One more candidate: only it is scored.
    let again = run(&recipe("auto [0.2, 1.0, 0.6, 0.4]"));
    assert_eq!(again.matches("[cached]").count(), 3, "{again}");
    assert_eq!(again.matches("m: lambda=").count(), 4, "{again}");

    // `obim eval RECIPE:MERGE` evaluates the merge without an output: the
    // same loss as the written (f32) output.
    let loss = |model: &str| {
        let data = demo().join("data/add/calib.jsonl");
        let out = obim(&[
            "eval",
            model,
            "--loss",
            "--limit",
            "16",
            "--format",
            "json",
            "--cache",
            cache.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["models"][0]["scores"][0]["loss"].as_f64().unwrap()
    };
    let merge_arg = format!("{}:m", dir.join("r.obim").display());
    let (from_recipe, from_output) = (loss(&merge_arg), loss(dir.join("out").to_str().unwrap()));
    assert!(
        (from_recipe - from_output).abs() < 1e-9,
        "{from_recipe} vs {from_output}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn obim_candidates_with_rules_and_scale() {
    let dir = temp("select-obim");
    let text = std::fs::read_to_string("tests/recipes/ok_auto_forms.obim")
        .unwrap()
        .replace("../../examples/demo", demo().to_str().unwrap());
    std::fs::write(dir.join("r.obim"), text).unwrap();
    let out = obim(&[
        "run",
        "--cache",
        dir.join("cache").to_str().unwrap(),
        dir.join("r.obim").to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // ta: 4 candidates; ob: 3 × 2 × 2.
    assert_eq!(stderr.matches("ta: lambda=").count(), 4, "{stderr}");
    assert_eq!(stderr.matches("ob: c retain=").count(), 12, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("out/ob/obim-report.json")).unwrap(),
    )
    .unwrap();
    let selection = &report["selection"]["ob"];
    let winner = selection["winner"].as_u64().unwrap() as usize;
    let means: Vec<f64> = selection["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["mean"].as_f64().unwrap())
        .collect();
    assert!(means.iter().all(|m| *m >= means[winner]));
    assert!(
        means.iter().any(|m| *m != means[winner]),
        "the settings changed nothing: {means:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `select by accuracy`: every candidate decodes the sources' prompts; the
/// most accurate wins (ties by loss), and its exact match per source equals
/// `obim eval` of the written (f32) merge on the same examples.
#[test]
fn the_most_accurate_candidate_is_written() {
    let dir = temp("select-accuracy");
    for (task, name) in [("add", "a.jsonl"), ("sort", "s.jsonl")] {
        let lines =
            std::fs::read_to_string(demo().join(format!("data/{task}/calib.jsonl"))).unwrap();
        let first: Vec<&str> = lines.lines().take(24).collect();
        std::fs::write(dir.join(name), first.join("\n") + "\n").unwrap();
    }
    let text = format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel sort = \"{0}/expert_sort\"\n\
         data a = jsonl(\"a.jsonl\")\ndata s = jsonl(\"s.jsonl\")\n\
         merge m = ties(base: llama, density: auto [0.2, 0.5, 0.8]) {{\n    add weight 1.0\n    sort weight 1.0\n    select by accuracy(a, s)\n}}\n\
         output m -> \"out\" {{ dtype f32 }}\n",
        demo().display()
    );
    let stderr = run_forced(&dir, &text);
    let report = report(&dir);
    let selection = &report["selection"]["m"];
    let candidates = selection["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 3);
    let key = |c: &serde_json::Value| {
        (
            c["accuracy"].as_f64().unwrap(),
            -c["mean"].as_f64().unwrap(),
        )
    };
    let best = (0..3)
        .max_by(|&i, &j| {
            key(&candidates[i])
                .partial_cmp(&key(&candidates[j]))
                .unwrap()
                .then(j.cmp(&i))
        })
        .unwrap();
    assert_eq!(selection["winner"].as_u64().unwrap() as usize, best);
    let winner = &candidates[best];
    assert!(stderr.contains("chose"), "{stderr}");
    let eval = obim(&[
        "eval",
        dir.join("out").to_str().unwrap(),
        "--data",
        dir.join("a.jsonl").to_str().unwrap(),
        "--data",
        dir.join("s.jsonl").to_str().unwrap(),
        "--format",
        "json",
    ]);
    assert!(eval.status.success());
    let eval: serde_json::Value = serde_json::from_slice(&eval.stdout).unwrap();
    for (i, score) in eval["models"][0]["scores"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        assert_eq!(
            score["accuracy"].as_f64().unwrap(),
            winner["accuracies"][i][1].as_f64().unwrap(),
            "source {i}"
        );
    }
    // A second run reads every score from the cache.
    let again = run_forced(&dir, &text);
    assert_eq!(again.matches("[cached]").count(), 3, "{again}");
}

/// `search coordinate budget N`: 4 × 4 = 16 candidates (one λ per pair of
/// layers), at most N scored, each move to a better point; a rerun with a
/// larger budget walks the same path from the cache and goes on.
#[test]
fn a_coordinate_search_stays_within_its_budget_and_continues() {
    let dir = temp("select-search");
    let recipe = |budget: usize| {
        format!(
            "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmodel sort = \"{0}/expert_sort\"\n\
             data a = jsonl(\"{0}/data/add/calib.jsonl\") {{ samples 16 }}\n\
             data s = jsonl(\"{0}/data/sort/calib.jsonl\") {{ samples 16 }}\n\
             merge m = task_arithmetic(base: llama, lambda: 0.5) {{\n    add weight 1.0\n    sort weight 1.0\n\
             layers \"model.layers.{{0..1}}.*\" {{ lambda: auto [0.2, 0.5, 0.8, 1.1] }}\n\
             layers \"model.layers.{{2..3}}.*\" {{ lambda: auto [0.2, 0.5, 0.8, 1.1] }}\n\
             select by loss(a, s) search coordinate budget {budget}\n}}\n\
             output m -> \"out\" {{ dtype f32 }}\n",
            demo().display()
        )
    };
    let run = |budget: usize| {
        let stderr = run_forced(&dir, &recipe(budget));
        let report = report(&dir);
        (stderr, report["selection"]["m"].clone())
    };
    let (_, first) = run(4);
    let candidates = first["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 4, "{first}");
    // The start is each site's middle value; the first round tries the
    // first site's other values.
    assert!(
        candidates[0]["candidate"]
            .as_str()
            .unwrap()
            .ends_with("line 9: lambda=0.5, line 10: lambda=0.5")
    );
    let means: Vec<f64> = candidates
        .iter()
        .map(|c| c["mean"].as_f64().unwrap())
        .collect();
    let winner = first["winner"].as_u64().unwrap() as usize;
    assert!(means.iter().all(|m| means[winner] <= *m));

    let (stderr, second) = run(10);
    let candidates = second["candidates"].as_array().unwrap();
    assert!(candidates.len() > 4 && candidates.len() <= 10, "{second}");
    assert_eq!(stderr.matches("[cached]").count(), 4, "{stderr}");
    let best = second["candidates"][second["winner"].as_u64().unwrap() as usize]["mean"]
        .as_f64()
        .unwrap();
    assert!(best <= means[winner]);
    // Every candidate is distinct.
    let mut labels: Vec<&str> = candidates
        .iter()
        .map(|c| c["candidate"].as_str().unwrap())
        .collect();
    labels.sort();
    labels.dedup();
    assert_eq!(labels.len(), candidates.len());
}
