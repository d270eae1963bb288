//! Models given by Hugging Face hub id: downloaded from a local server that
//! speaks the hub's protocol (`/api/models/ID/revision/REV` for the file
//! list, `/ID/resolve/REV/FILE` with `Range`, `ETag` and `X-Repo-Commit`
//! for files), pointed at with `HF_ENDPOINT`, into an `HF_HUB_CACHE` of the
//! test's own; then used from that cache with no server.
#![expect(clippy::unwrap_used, reason = "test helpers")]

use crate::common::{demo, obim, temp};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// One repository the server serves: its files are a directory's.
struct Repo {
    id: &'static str,
    dir: PathBuf,
    commit: String,
    /// Listed in the file list but never served (obim must not ask).
    listed_only: Vec<&'static str>,
}

struct Hub {
    url: String,
    requests: Arc<Mutex<Vec<String>>>,
    server: Arc<tiny_http::Server>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Hub {
    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn header(name: &str, value: &str) -> tiny_http::Header {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).unwrap()
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && dir.join(n).is_file())
        .collect();
    names.sort();
    names
}

fn serve(repos: Vec<Repo>) -> Hub {
    let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").unwrap());
    let url = format!("http://{}", server.server_addr().to_ip().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (s, log) = (server.clone(), requests.clone());
    let thread = std::thread::spawn(move || {
        for request in s.incoming_requests() {
            let path = request
                .url()
                .split('?')
                .next()
                .unwrap_or_default()
                .to_string();
            let range = request
                .headers()
                .iter()
                .find(|h| h.field.equiv("Range"))
                .map(|h| h.value.to_string());
            log.lock()
                .unwrap()
                .push(format!("{path} {}", range.clone().unwrap_or_default()));
            let response = respond(&repos, &path, range.as_deref());
            let _ = request.respond(response);
        }
    });
    Hub {
        url,
        requests,
        server,
        thread: Some(thread),
    }
}

fn respond(
    repos: &[Repo],
    path: &str,
    range: Option<&str>,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let not_found =
        || tiny_http::Response::from_string("Repository not found").with_status_code(404);
    if path.contains("obim-test/gated") {
        return tiny_http::Response::from_string("Access to model is restricted")
            .with_status_code(403);
    }
    if let Some(rest) = path.strip_prefix("/api/models/") {
        let Some(repo) = repos
            .iter()
            .find(|r| rest.starts_with(&format!("{}/revision/", r.id)))
        else {
            return not_found();
        };
        let siblings: Vec<serde_json::Value> = files(&repo.dir)
            .into_iter()
            .chain(repo.listed_only.iter().map(|s| s.to_string()))
            .map(|f| serde_json::json!({ "rfilename": f }))
            .collect();
        let body = serde_json::json!({ "id": repo.id, "sha": repo.commit, "siblings": siblings });
        return tiny_http::Response::from_string(body.to_string())
            .with_header(header("Content-Type", "application/json"));
    }
    let Some(repo) = repos
        .iter()
        .find(|r| path.starts_with(&format!("/{}/resolve/", r.id)))
    else {
        return not_found();
    };
    let after = &path[format!("/{}/resolve/", repo.id).len()..];
    let Some((_revision, file)) = after.split_once('/') else {
        return not_found();
    };
    let Ok(bytes) = std::fs::read(repo.dir.join(file)) else {
        return tiny_http::Response::from_string("Entry not found").with_status_code(404);
    };
    let size = bytes.len();
    let start: usize = range
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.split('-').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let end = match range
        .and_then(|r| r.split('-').nth(1))
        .filter(|e| !e.is_empty())
    {
        Some(e) => e.parse::<usize>().unwrap() + 1,
        None => size,
    };
    let etag = blake3::hash(&bytes).to_hex().to_string();
    tiny_http::Response::from_data(bytes[start.min(size)..end.min(size)].to_vec())
        .with_status_code(206)
        .with_header(header(
            "Content-Range",
            &format!("bytes {start}-{}/{size}", end.max(1) - 1),
        ))
        .with_header(header("ETag", &format!("\"{etag}\"")))
        .with_header(header("X-Repo-Commit", &repo.commit))
}

/// `obim ARGS` against `endpoint` with `cache` as the Hugging Face cache.
fn obim_hub(args: &[&str], endpoint: &str, cache: &Path, offline: bool) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_obim"));
    command
        .args(args)
        .env("NO_COLOR", "1")
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.join("home"))
        .env_remove("HF_TOKEN")
        .env_remove("HF_HUB_OFFLINE");
    if offline {
        command.env("HF_HUB_OFFLINE", "1");
    }
    command.output().unwrap()
}

fn commit(n: u8) -> String {
    format!("{n:x}").repeat(40)[..40].to_string()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A sharded copy of the `add` expert (linear, weight 1), written by obim.
fn sharded_expert(dir: &Path) -> PathBuf {
    let d = demo();
    let recipe = format!(
        "base llama = \"{0}/base\"\nmodel add = \"{0}/expert_add\"\nmerge m = linear {{ add weight 1.0 }}\noutput m -> \"sharded\" {{ shard_size \"200KB\" }}\n",
        d.display()
    );
    std::fs::write(dir.join("shard.obim"), recipe).unwrap();
    let out = obim(&["run", dir.join("shard.obim").to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let sharded = dir.join("sharded");
    assert!(sharded.join("model.safetensors.index.json").is_file());
    sharded
}

fn recipe(dir: &Path, name: &str, base: &str, add: &str, reverse: &str) -> PathBuf {
    let text = format!(
        "base llama = {base}\nmodel add = {add}\nmodel reverse = {reverse}\nmerge m = task_arithmetic(base: llama) {{\n    add weight 0.5\n    reverse weight 0.5\n}}\noutput m -> \"out-{name}\"\n"
    );
    let path = dir.join(format!("{name}.obim"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn hub_models_are_downloaded_into_the_cache_then_used_offline() {
    let dir = temp("hub-download");
    let sharded = sharded_expert(&dir);
    let d = demo();
    let hub = serve(vec![
        Repo {
            id: "obim-test/base",
            dir: d.join("base"),
            commit: commit(1),
            listed_only: vec!["README.md", "pytorch_model.bin", ".gitattributes"],
        },
        Repo {
            id: "obim-test/add-sharded",
            dir: sharded.clone(),
            commit: commit(2),
            listed_only: vec![],
        },
        Repo {
            id: "obim-test/reverse",
            dir: d.join("expert_reverse"),
            commit: commit(3),
            listed_only: vec![],
        },
    ]);
    let cache = dir.join("hf");
    // An earlier run was interrupted half way through one file: its `.part`
    // file is resumed from where it stopped.
    let reverse_weights = std::fs::read(d.join("expert_reverse/model.safetensors")).unwrap();
    let half = reverse_weights.len() / 2;
    let blobs = cache.join("models--obim-test--reverse/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let etag = blake3::hash(&reverse_weights).to_hex().to_string();
    std::fs::write(blobs.join(format!("{etag}.part")), &reverse_weights[..half]).unwrap();
    let from_hub = recipe(
        &dir,
        "hub",
        "\"obim-test/base\"",
        "\"obim-test/add-sharded\" @ \"v1\"",
        "\"obim-test/reverse\"",
    );
    let out = obim_hub(
        &["run", from_hub.to_str().unwrap()],
        &hub.url,
        &cache,
        false,
    );
    assert!(out.status.success(), "{}", text(&out));
    let log = text(&out);
    assert!(
        log.contains("add: `obim-test/add-sharded` is not in the local Hugging Face cache; downloading from http://127.0.0.1"),
        "{log}"
    );

    // The cache has huggingface_hub's layout: refs, snapshots linking blobs.
    let repo = cache.join("models--obim-test--add-sharded");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/v1")).unwrap(),
        commit(2)
    );
    let snapshot = repo.join("snapshots").join(commit(2));
    for file in files(&sharded) {
        // obim's own records of the merge, which reading a model skips.
        if file == "obim-report.json" || file == "README.md" {
            continue;
        }
        assert_eq!(
            std::fs::read(snapshot.join(&file)).unwrap(),
            std::fs::read(sharded.join(&file)).unwrap(),
            "{file}"
        );
    }
    // Only what obim reads was asked for.
    let requests = hub.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("/api/models/obim-test/add-sharded/revision/v1"))
    );
    assert!(
        requests
            .iter()
            .any(|r| r.contains("/resolve/v1/model-00002-of-"))
    );
    for never in [
        "README.md",
        "pytorch_model.bin",
        ".gitattributes",
        "obim-report.json",
    ] {
        assert!(
            !requests.iter().any(|r| r.contains(never)),
            "{never} was requested: {requests:?}"
        );
    }

    // The merge equals the same recipe over the local directories.
    let local = recipe(
        &dir,
        "local",
        &format!("\"{}\"", d.join("base").display()),
        &format!("\"{}\"", sharded.display()),
        &format!("\"{}\"", d.join("expert_reverse").display()),
    );
    let out = obim(&["run", local.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        std::fs::read(dir.join("out-hub/model.safetensors")).unwrap(),
        std::fs::read(dir.join("out-local/model.safetensors")).unwrap()
    );

    // Again, offline and with the server gone: the cache alone serves.
    let served = hub.requests().len();
    let url = hub.url.clone();
    drop(hub);
    let out = obim_hub(
        &["run", "--force", from_hub.to_str().unwrap()],
        &url,
        &cache,
        true,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("downloading"), "{}", text(&out));
    assert!(served > 0);
    // A hub id on the command line too.
    let data = d.join("data/reverse/test.jsonl");
    let args = [
        "eval",
        "obim-test/reverse",
        "--data",
        data.to_str().unwrap(),
        "--limit",
        "4",
    ];
    let out = obim_hub(&args, &url, &cache, true);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("obim-test/reverse"),
        "{}",
        text(&out)
    );
}

#[test]
fn hub_errors_say_what_to_do() {
    let dir = temp("hub-errors");
    let d = demo();
    // A repository whose weights are cut off half way.
    let truncated = dir.join("truncated");
    std::fs::create_dir_all(&truncated).unwrap();
    std::fs::copy(d.join("base/config.json"), truncated.join("config.json")).unwrap();
    let weights = std::fs::read(d.join("base/model.safetensors")).unwrap();
    std::fs::write(
        truncated.join("model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    // A repository with PyTorch weights only.
    let pickles = dir.join("pickles");
    std::fs::create_dir_all(&pickles).unwrap();
    std::fs::copy(d.join("base/config.json"), pickles.join("config.json")).unwrap();
    let hub = serve(vec![
        Repo {
            id: "obim-test/truncated",
            dir: truncated,
            commit: commit(4),
            listed_only: vec![],
        },
        Repo {
            id: "obim-test/pickles",
            dir: pickles,
            commit: commit(5),
            listed_only: vec!["pytorch_model.bin"],
        },
    ]);
    let cache = dir.join("hf");
    let local_base = format!("\"{}\"", d.join("base").display());
    let local_reverse = format!("\"{}\"", d.join("expert_reverse").display());
    let case = |name: &str, add: &str, endpoint: &str, offline: bool| -> String {
        let path = recipe(&dir, name, &local_base, add, &local_reverse);
        let out = obim_hub(&["run", path.to_str().unwrap()], endpoint, &cache, offline);
        assert_eq!(out.status.code(), Some(3), "{name}: {}", text(&out));
        assert!(
            !dir.join(format!("out-{name}")).exists(),
            "{name} left an output"
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };

    let e = case("missing", "\"obim-test/no-such-model\"", &hub.url, false);
    assert!(
        e.contains("error: add: `obim-test/no-such-model` was not found on http://127.0.0.1"),
        "{e}"
    );
    assert!(e.contains("check the id and the revision"), "{e}");

    let e = case("gated", "\"obim-test/gated\"", &hub.url, false);
    assert!(
        e.contains("refused access (HTTP 403)") && e.contains("HF_TOKEN"),
        "{e}"
    );

    let e = case("pickles", "\"obim-test/pickles\"", &hub.url, false);
    assert!(
        e.contains("has no safetensors weights (it has: config.json, pytorch_model.bin)"),
        "{e}"
    );

    let e = case("truncated", "\"obim-test/truncated\"", &hub.url, false);
    assert!(
        e.contains(
            "the download of `model.safetensors` of `obim-test/truncated` is incomplete or corrupt"
        ),
        "{e}"
    );
    // Removed, so that the next run fetches it again rather than using it.
    let snapshot = cache
        .join("models--obim-test--truncated/snapshots")
        .join(commit(4));
    assert!(!snapshot.join("model.safetensors").exists());
    assert!(snapshot.join("config.json").exists());

    let e = case("offline", "\"obim-test/other\"", &hub.url, true);
    assert!(
        e.contains("`obim-test/other` is not in the local Hugging Face cache")
            && e.contains("HF_HUB_OFFLINE is set")
            && e.contains("huggingface-cli download obim-test/other")
            && !e.contains("downloading from"),
        "{e}"
    );

    // Nothing listens on the endpoint.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let e = case(
        "unreachable",
        "\"obim-test/other\" @ \"v2\"",
        &closed,
        false,
    );
    assert!(
        e.contains("cannot reach http://127.0.0.1")
            && e.contains("huggingface-cli download obim-test/other --revision v2"),
        "{e}"
    );
}

#[test]
fn hub_ids_are_told_from_paths() {
    use obim::hub::parse_id;
    assert_eq!(parse_id("org/name"), Some(("org/name", None)));
    assert_eq!(
        parse_id("meta-llama/Llama-3.2-1B@main"),
        Some(("meta-llama/Llama-3.2-1B", Some("main")))
    );
    assert_eq!(parse_id("./dir"), None);
    assert_eq!(parse_id("/abs/dir"), None);
    assert_eq!(parse_id("a/b/c"), None);
    assert_eq!(parse_id("name"), None);
    assert_eq!(parse_id("org/name@"), None);
}
