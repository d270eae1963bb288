//! Models given by Hugging Face hub id: the local cache (the layout of
//! `huggingface_hub`: `models--ORG--NAME/{refs,snapshots,blobs}`) and
//! downloading into it with the `hf-hub` crate. Only what obim reads is
//! fetched: `config.json`, `generation_config.json`, the tokenizer files and
//! the safetensors weights (the index and the shards it names).
//!
//! Environment, as `huggingface_hub` reads it: `HF_HUB_CACHE` / `HF_HOME`
//! (where), `HF_ENDPOINT` (which server), `HF_TOKEN` or the token file
//! (gated and private models), `HF_HUB_OFFLINE=1` (never connect).

use crate::checkpoint;
use hf_hub::api::sync::{ApiBuilder, ApiError};
use hf_hub::{Cache, Repo, RepoType};
use std::path::{Path, PathBuf};

/// Files obim copies from the tokenizer source to an output, and fetches
/// with a model.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";
const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "`{id}` is not in the local Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set; {how}"
    )]
    Offline {
        id: String,
        cache: String,
        how: String,
    },
    #[error("cannot reach {endpoint} to download `{id}`: {reason}; {how}")]
    Unreachable {
        id: String,
        endpoint: String,
        reason: String,
        how: String,
    },
    #[error(
        "`{id}`{revision} was not found on {endpoint}: check the id and the revision (a private model needs HF_TOKEN)"
    )]
    NotFound {
        id: String,
        revision: String,
        endpoint: String,
    },
    #[error(
        "`{id}` on {endpoint} refused access (HTTP {status}): a gated model needs its licence accepted on the hub, then HF_TOKEN set (or `huggingface-cli login`)"
    )]
    Denied {
        id: String,
        endpoint: String,
        status: u16,
    },
    #[error(
        "`{id}` has no safetensors weights (it has: {files}); obim reads safetensors only: convert the checkpoint first (transformers: `save_pretrained(..., safe_serialization=True)`)"
    )]
    NoSafetensors { id: String, files: String },
    #[error("downloading `{file}` of `{id}` failed: {reason}")]
    Download {
        id: String,
        file: String,
        reason: String,
    },
    #[error(
        "the download of `{file}` of `{id}` is incomplete or corrupt ({reason}); it was removed from the cache: run again to fetch it again"
    )]
    Corrupt {
        id: String,
        file: String,
        reason: String,
    },
    #[error("no Hugging Face cache directory: set HF_HOME or HF_HUB_CACHE")]
    NoCache,
}

/// The Hugging Face hub cache: `HF_HUB_CACHE`, else `HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// The snapshot directory of `id` at `revision` (default `main`) in the
/// local Hugging Face cache, if it is there.
pub fn find_cached(id: &str, revision: Option<&str>) -> Option<PathBuf> {
    let repo = cache_dir()?.join(format!("models--{}", id.replace('/', "--")));
    let revision = revision.unwrap_or("main");
    let commit = if is_commit(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo.join("refs").join(revision))
            .ok()?
            .trim()
            .to_string()
    };
    let snapshot = repo.join("snapshots").join(commit);
    (snapshot.is_dir() && has_weights(&snapshot)).then_some(snapshot)
}

/// `org/name` or `org/name@revision`, when `text` looks like a hub id.
pub fn parse_id(text: &str) -> Option<(&str, Option<&str>)> {
    let (id, revision) = match text.split_once('@') {
        Some((id, rev)) if !rev.is_empty() => (id, Some(rev)),
        Some(_) => return None,
        None => (text, None),
    };
    let (org, name) = id.split_once('/')?;
    let part = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (part(org) && part(name)).then_some((id, revision))
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// A snapshot with an index counts only when every shard it names is there,
/// so an interrupted download is resumed rather than used.
fn has_weights(snapshot: &Path) -> bool {
    if let Some(shards) = index_shards(&snapshot.join(INDEX)) {
        return shards.iter().all(|s| snapshot.join(s).is_file());
    }
    snapshot.join(SINGLE).is_file()
}

/// The shard files an index names, if the index is readable.
fn index_shards(index: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(index).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let mut shards: Vec<String> = value
        .get("weight_map")?
        .as_object()?
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    shards.sort();
    shards.dedup();
    Some(shards)
}

/// The endpoint downloads go to (`HF_ENDPOINT`, else huggingface.co).
pub fn endpoint() -> String {
    std::env::var("HF_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty())
        .map_or_else(
            || DEFAULT_ENDPOINT.to_string(),
            |e| e.trim_end_matches('/').to_string(),
        )
}

/// `HF_HUB_OFFLINE` is set: nothing is downloaded.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim(), "1" | "true" | "TRUE" | "yes" | "ON" | "on"))
}

/// What to tell a user with no network.
fn how_to_fetch(id: &str, revision: Option<&str>) -> String {
    let rev = revision.map_or_else(String::new, |r| format!(" --revision {r}"));
    format!(
        "fetch it on a machine with network access (`huggingface-cli download {id}{rev}`) and copy the cache directory here (HF_HUB_CACHE), or give the model's local directory in the recipe"
    )
}

/// One file being downloaded: what the progress display shows.
pub trait DownloadProgress {
    fn start(&mut self, file: &str, bytes: u64);
    fn advance(&mut self, bytes: u64);
    fn finish(&mut self);
}

impl DownloadProgress for () {
    fn start(&mut self, _file: &str, _bytes: u64) {}
    fn advance(&mut self, _bytes: u64) {}
    fn finish(&mut self) {}
}

struct Adapter<'a>(&'a mut dyn DownloadProgress);

impl hf_hub::api::Progress for Adapter<'_> {
    fn init(&mut self, size: usize, filename: &str) {
        self.0.start(filename, size as u64);
    }
    fn update(&mut self, size: usize) {
        self.0.advance(size as u64);
    }
    fn finish(&mut self) {
        self.0.finish();
    }
}

/// The snapshot directory of `id` at `revision`: from the local cache, or
/// downloaded into it (only the files obim reads; a partial earlier download
/// is resumed).
pub fn fetch(
    id: &str,
    revision: Option<&str>,
    progress: &mut dyn DownloadProgress,
) -> Result<PathBuf, HubError> {
    if let Some(dir) = find_cached(id, revision) {
        return Ok(dir);
    }
    let cache = cache_dir().ok_or(HubError::NoCache)?;
    if offline() {
        return Err(HubError::Offline {
            id: id.to_string(),
            cache: cache.display().to_string(),
            how: how_to_fetch(id, revision),
        });
    }
    let endpoint = endpoint();
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| Cache::new(cache.clone()).token());
    let repo_spec = Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        revision.unwrap_or("main").to_string(),
    );
    let cached = Cache::new(cache.clone()).repo(repo_spec.clone());
    let api = ApiBuilder::from_cache(Cache::new(cache))
        .with_endpoint(endpoint.clone())
        .with_token(token)
        .with_progress(false)
        .with_user_agent("obim", env!("CARGO_PKG_VERSION"))
        .build()
        .map_err(|e| HubError::Unreachable {
            id: id.to_string(),
            endpoint: endpoint.clone(),
            reason: e.to_string(),
            how: how_to_fetch(id, revision),
        })?;
    let repo = api.repo(repo_spec);
    let request = Request {
        id,
        revision,
        endpoint: &endpoint,
    };
    let info = repo.info().map_err(|e| request.error(e, None))?;
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let mut wanted: Vec<String> = ["config.json", "generation_config.json"]
        .iter()
        .chain(TOKENIZER_FILES)
        .filter(|f| files.contains(f))
        .map(|f| (*f).to_string())
        .collect();
    let mut get = |file: &str| -> Result<PathBuf, HubError> {
        // The cached copy when this revision has it; otherwise a download
        // (appending to the `.part` file an interrupted run left).
        match cached.get(file) {
            Some(path) => Ok(path),
            None => repo
                .download_with_progress(file, Adapter(&mut *progress))
                .map_err(|e| request.error(e, Some(file))),
        }
    };
    let weights = request.weight_files(&files, &mut get)?;
    wanted.extend(weights.iter().cloned());
    let mut snapshot = None;
    for file in &wanted {
        let path = get(file)?;
        if file.ends_with(".safetensors")
            && let Err(e) = checkpoint::read_header(&path)
        {
            remove_download(&path);
            return Err(HubError::Corrupt {
                id: id.to_string(),
                file: file.clone(),
                reason: e.to_string(),
            });
        }
        snapshot = path.parent().map(Path::to_path_buf);
    }
    snapshot.ok_or_else(|| HubError::NoSafetensors {
        id: id.to_string(),
        files: String::new(),
    })
}

/// One model being fetched: what its errors name.
struct Request<'a> {
    id: &'a str,
    revision: Option<&'a str>,
    endpoint: &'a str,
}

impl Request<'_> {
    /// A hub API error as what it means for this model (and `file`, if any).
    fn error(&self, e: ApiError, file: Option<&str>) -> HubError {
        if let ApiError::RequestError(boxed) = &e {
            match boxed.as_ref() {
                ureq::Error::Status(404, _) => {
                    return HubError::NotFound {
                        id: self.id.to_string(),
                        revision: self
                            .revision
                            .map_or_else(String::new, |r| format!(" at revision `{r}`")),
                        endpoint: self.endpoint.to_string(),
                    };
                }
                ureq::Error::Status(status @ (401 | 403), _) => {
                    return HubError::Denied {
                        id: self.id.to_string(),
                        endpoint: self.endpoint.to_string(),
                        status: *status,
                    };
                }
                ureq::Error::Transport(t) if file.is_none() => {
                    return HubError::Unreachable {
                        id: self.id.to_string(),
                        endpoint: self.endpoint.to_string(),
                        reason: t.to_string(),
                        how: how_to_fetch(self.id, self.revision),
                    };
                }
                _ => {}
            }
        }
        HubError::Download {
            id: self.id.to_string(),
            file: file.unwrap_or("the file list").to_string(),
            reason: e.to_string(),
        }
    }

    /// The weight files to download: the index's shards, else the single file.
    fn weight_files(
        &self,
        files: &[&str],
        get: &mut dyn FnMut(&str) -> Result<PathBuf, HubError>,
    ) -> Result<Vec<String>, HubError> {
        Ok(if files.contains(&INDEX) {
            let index = get(INDEX)?;
            let shards = index_shards(&index).ok_or_else(|| HubError::Corrupt {
                id: self.id.to_string(),
                file: INDEX.to_string(),
                reason: "not a safetensors index with a `weight_map`".to_string(),
            });
            let shards = match shards {
                Ok(s) => s,
                Err(e) => {
                    remove_download(&index);
                    return Err(e);
                }
            };
            if let Some(missing) = shards.iter().find(|s| !files.contains(&s.as_str())) {
                return Err(HubError::Download {
                    id: self.id.to_string(),
                    file: missing.clone(),
                    reason: format!("{INDEX} names it but the repository has no such file"),
                });
            }
            shards
        } else if files.contains(&SINGLE) {
            vec![SINGLE.to_string()]
        } else {
            let mut listed: Vec<&str> = files
                .iter()
                .copied()
                .filter(|f| !f.starts_with('.'))
                .collect();
            listed.truncate(12);
            return Err(HubError::NoSafetensors {
                id: self.id.to_string(),
                files: listed.join(", "),
            });
        })
    }
}

/// Removes a downloaded file: the snapshot's link and the blob it points to.
fn remove_download(pointer: &Path) {
    if let Ok(blob) = std::fs::canonicalize(pointer)
        && blob != pointer
    {
        let _ = std::fs::remove_file(blob);
    }
    let _ = std::fs::remove_file(pointer);
}
