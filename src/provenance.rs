//! What an output was made from, for its report: the blake3 of every input
//! weight file (what `b3sum FILE` prints), cached in `hashes/` of obim's
//! cache by the file's identity (canonical path, length, modification time,
//! inode), as `make` and `git` trust a file that has not changed on disk
//! to have the same content. A new or touched file is hashed again.

use crate::checkpoint::ModelInfo;
use crate::tensors::TensorError;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// One weight file of an input and its content hash.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct FileHash {
    /// The file name within the model directory.
    pub file: String,
    pub bytes: u64,
    pub blake3: String,
}

/// The blake3 of every safetensors file of `model`, in name order.
pub fn weight_files(
    model: &ModelInfo,
    cache: &Path,
    stop: &AtomicBool,
) -> Result<Vec<FileHash>, TensorError> {
    let files: BTreeSet<&PathBuf> = model.tensors.values().map(|t| &t.file).collect();
    files
        .into_iter()
        .map(|path| {
            let read = |source| TensorError::Read {
                path: path.clone(),
                source,
            };
            let (identity, bytes) = identity(path).map_err(read)?;
            let blake3 = cached(cache, &identity).map_or_else(
                || -> Result<String, TensorError> {
                    let hash = hash_file(path, stop).map_err(read)?;
                    store(cache, &identity, &hash);
                    Ok(hash)
                },
                Ok,
            )?;
            Ok(FileHash {
                file: path
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
                bytes,
                blake3,
            })
        })
        .collect()
}

/// The hashes of several models, one file after another: meant to run on a
/// thread of its own beside the merge, which leaves a core idle while it
/// waits for pages.
/// Stops early (with an error) when `stop` is set.
pub fn models(
    models: &[&ModelInfo],
    cache: &Path,
    stop: &AtomicBool,
) -> Result<Vec<Vec<FileHash>>, TensorError> {
    models
        .iter()
        .map(|m| weight_files(m, cache, stop))
        .collect()
}

/// Read in blocks rather than mapped, so that the pages do not count towards
/// obim's resident memory.
fn hash_file(path: &Path, stop: &AtomicBool) -> std::io::Result<String> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = blake3::Hasher::new();
    let mut block = vec![0u8; 1 << 22];
    loop {
        let n = file.read(&mut block)?;
        if n == 0 {
            break;
        }
        if stop.load(Ordering::Relaxed) {
            return Err(std::io::Error::other("stopped"));
        }
        hasher.update(&block[..n]);
    }
    Ok(hasher.finalize().to_hex().to_string())
}

fn identity(path: &Path) -> std::io::Result<(String, u64)> {
    let meta = std::fs::metadata(path)?;
    let canonical = std::fs::canonicalize(path)?;
    let modified = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    #[cfg(unix)]
    let inode = {
        use std::os::unix::fs::MetadataExt;
        format!("{}:{}", meta.dev(), meta.ino())
    };
    #[cfg(not(unix))]
    let inode = String::new();
    Ok((
        format!("{}|{}|{modified}|{inode}", canonical.display(), meta.len()),
        meta.len(),
    ))
}

fn entry(cache: &Path, identity: &str) -> PathBuf {
    cache
        .join("hashes")
        .join(blake3::hash(identity.as_bytes()).to_hex().as_str())
}

fn cached(cache: &Path, identity: &str) -> Option<String> {
    let text = std::fs::read_to_string(entry(cache, identity)).ok()?;
    let (id, hash) = text.split_once('\n')?;
    let hash = hash.trim();
    (id == identity && hash.len() == 64 && hash.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| hash.to_string())
}

/// Best effort: a cache that cannot be written only costs a hash next time.
fn store(cache: &Path, identity: &str, hash: &str) {
    let path = entry(cache, identity);
    let Some(dir) = path.parent() else {
        return;
    };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, format!("{identity}\n{hash}\n")).is_ok() {
        let _ = std::fs::rename(&tmp, &path);
    }
}
