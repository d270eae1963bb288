//! Hugging Face model directories, header first: `config.json`, the
//! safetensors index and every shard's header (names, dtypes, shapes,
//! offsets), validated without reading any tensor data.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest header obim accepts (the safetensors format's own limit).
const MAX_HEADER: u64 = 100_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("model directory `{0}` does not exist")]
    NotFound(PathBuf),
    #[error("`{0}` has no `model.safetensors` and no `model.safetensors.index.json`")]
    NoWeights(PathBuf),
    #[error("failed to read `{path}`: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("`{path}`: {reason}")]
    Header { path: PathBuf, reason: String },
    #[error("`{path}`: tensor `{tensor}`: {reason}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("`{index}` names shard `{shard}`, which does not exist")]
    MissingShard { index: PathBuf, shard: String },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TensorInfo {
    pub dtype: TensorDtype,
    pub shape: Vec<usize>,
    /// The shard holding the tensor.
    pub file: PathBuf,
    /// Byte range within the shard's data section.
    pub offsets: (u64, u64),
    /// Where the data section starts in the file (8 + header length).
    pub data_start: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub dir: PathBuf,
    /// `architectures[0]` of config.json.
    pub architecture: Option<String>,
    pub config: Value,
    pub tensors: BTreeMap<String, TensorInfo>,
    /// blake3 of config.json, every shard's header, length, canonical path
    /// and modification time: changes whenever the checkpoint does, without
    /// reading the weights (a hub snapshot's path holds its commit).
    pub hash: String,
}

impl ModelInfo {
    pub fn params(&self) -> usize {
        self.tensors.values().map(TensorInfo::numel).sum()
    }
    /// The dtypes of the tensors, most common first.
    pub fn dtype(&self) -> Option<TensorDtype> {
        let mut counts: BTreeMap<TensorDtype, usize> = BTreeMap::new();
        for t in self.tensors.values() {
            *counts.entry(t.dtype).or_default() += 1;
        }
        counts.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d)
    }
}

/// A tensor's dtype as a safetensors header names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorDtype {
    Bool,
    U8,
    I8,
    F8E4M3,
    F8E5M2,
    I16,
    U16,
    F16,
    Bf16,
    I32,
    U32,
    F32,
    I64,
    U64,
    F64,
}

impl TensorDtype {
    pub const ALL: &'static [TensorDtype] = &[
        TensorDtype::Bool,
        TensorDtype::U8,
        TensorDtype::I8,
        TensorDtype::F8E4M3,
        TensorDtype::F8E5M2,
        TensorDtype::I16,
        TensorDtype::U16,
        TensorDtype::F16,
        TensorDtype::Bf16,
        TensorDtype::I32,
        TensorDtype::U32,
        TensorDtype::F32,
        TensorDtype::I64,
        TensorDtype::U64,
        TensorDtype::F64,
    ];

    /// The header's spelling (`BF16`).
    pub fn name(self) -> &'static str {
        match self {
            TensorDtype::Bool => "BOOL",
            TensorDtype::U8 => "U8",
            TensorDtype::I8 => "I8",
            TensorDtype::F8E4M3 => "F8_E4M3",
            TensorDtype::F8E5M2 => "F8_E5M2",
            TensorDtype::I16 => "I16",
            TensorDtype::U16 => "U16",
            TensorDtype::F16 => "F16",
            TensorDtype::Bf16 => "BF16",
            TensorDtype::I32 => "I32",
            TensorDtype::U32 => "U32",
            TensorDtype::F32 => "F32",
            TensorDtype::I64 => "I64",
            TensorDtype::U64 => "U64",
            TensorDtype::F64 => "F64",
        }
    }

    pub fn parse(name: &str) -> Option<TensorDtype> {
        TensorDtype::ALL.iter().copied().find(|d| d.name() == name)
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::Bool
            | TensorDtype::U8
            | TensorDtype::I8
            | TensorDtype::F8E4M3
            | TensorDtype::F8E5M2 => 1,
            TensorDtype::I16 | TensorDtype::U16 | TensorDtype::F16 | TensorDtype::Bf16 => 2,
            TensorDtype::I32 | TensorDtype::U32 | TensorDtype::F32 => 4,
            TensorDtype::I64 | TensorDtype::U64 | TensorDtype::F64 => 8,
        }
    }

    /// Bytes per element of the float dtypes obim decodes and merges (bf16,
    /// f16, f32); `None` for any other.
    pub fn float_width(self) -> Option<usize> {
        matches!(
            self,
            TensorDtype::Bf16 | TensorDtype::F16 | TensorDtype::F32
        )
        .then_some(self.size())
    }
}

impl std::fmt::Display for TensorDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl serde::Serialize for TensorDtype {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Opens a model directory: config.json (optional), then the index and
/// shard headers, or the single `model.safetensors`.
pub fn open_dir(dir: &Path) -> Result<ModelInfo, CheckpointError> {
    if !dir.is_dir() {
        return Err(CheckpointError::NotFound(dir.to_path_buf()));
    }
    let mut hasher = blake3::Hasher::new();
    let config_path = dir.join("config.json");
    let config = if config_path.is_file() {
        let bytes = std::fs::read(&config_path).map_err(|source| CheckpointError::Io {
            path: config_path.clone(),
            source,
        })?;
        hasher.update(&bytes);
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Header {
            path: config_path.clone(),
            reason: format!("invalid JSON: {e}"),
        })?
    } else {
        Value::Null
    };
    let architecture = config
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .map(String::from);
    let index_path = dir.join("model.safetensors.index.json");
    let single = dir.join("model.safetensors");
    let mut tensors = BTreeMap::new();
    if index_path.is_file() {
        let bytes = std::fs::read(&index_path).map_err(|source| CheckpointError::Io {
            path: index_path.clone(),
            source,
        })?;
        let index: Value = serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Header {
            path: index_path.clone(),
            reason: format!("invalid JSON: {e}"),
        })?;
        let Some(map) = index.get("weight_map").and_then(Value::as_object) else {
            return Err(CheckpointError::Header {
                path: index_path,
                reason: "no `weight_map` object".into(),
            });
        };
        let mut shards: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (tensor, shard) in map {
            let Some(shard) = shard.as_str() else {
                return Err(CheckpointError::Tensor {
                    path: index_path,
                    tensor: tensor.clone(),
                    reason: "shard name is not a string".into(),
                });
            };
            shards.entry(shard).or_default().push(tensor);
        }
        for (shard, names) in shards {
            let path = dir.join(shard);
            if shard.contains('/') || shard.contains('\\') || !path.is_file() {
                return Err(CheckpointError::MissingShard {
                    index: index_path,
                    shard: shard.to_string(),
                });
            }
            let (header, shard_tensors) = read_header(&path)?;
            hasher.update(&header);
            hasher.update(file_identity(&path).as_bytes());
            for name in names {
                let Some(info) = shard_tensors.get(name) else {
                    return Err(CheckpointError::Tensor {
                        path,
                        tensor: name.to_string(),
                        reason: "named in the index but not in this shard".into(),
                    });
                };
                tensors.insert(name.to_string(), info.clone());
            }
        }
    } else if single.is_file() {
        let (header, t) = read_header(&single)?;
        hasher.update(&header);
        hasher.update(file_identity(&single).as_bytes());
        tensors = t;
    } else {
        return Err(CheckpointError::NoWeights(dir.to_path_buf()));
    }
    Ok(ModelInfo {
        dir: dir.to_path_buf(),
        architecture,
        config,
        tensors,
        hash: hasher.finalize().to_hex().to_string(),
    })
}

/// Canonical path and modification time: two copies of one checkpoint with
/// identical headers (every fine-tune of a base) must not share a cache key.
fn file_identity(path: &Path) -> String {
    let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    format!("{}|{modified}", canonical.display())
}

/// Reads and validates one safetensors header. Returns the raw header
/// (length prefix, JSON, file length, for hashing) and its tensors.
pub fn read_header(
    path: &Path,
) -> Result<(Vec<u8>, BTreeMap<String, TensorInfo>), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason: String| CheckpointError::Header {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(io)?;
    let file_len = file.metadata().map_err(io)?.len();
    if file_len < 8 {
        return Err(bad(format!(
            "file is {file_len} bytes, shorter than the 8-byte header length"
        )));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(io)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER {
        return Err(bad(format!(
            "header length {header_len} exceeds the limit of {MAX_HEADER} bytes"
        )));
    }
    if header_len > file_len - 8 {
        return Err(bad(format!(
            "header length {header_len} is larger than the file ({file_len} bytes): truncated file?"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(io)?;
    let data_len = file_len - 8 - header_len;
    let Entries(entries) = serde_json::from_slice(&header).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => bad("header is not a JSON object".into()),
        _ => bad(format!("header is not valid JSON: {e}")),
    })?;
    let mut tensors = BTreeMap::new();
    for (name, entry) in &entries {
        if name == "__metadata__" {
            continue;
        }
        let info = tensor_entry(path, name, entry, data_len, 8 + header_len)?;
        if tensors.insert(name.clone(), info).is_some() {
            // JSON parsers keep the last of two equal keys; the `safetensors`
            // package rejects the file, and so does obim.
            return Err(CheckpointError::Tensor {
                path: path.to_path_buf(),
                tensor: name.clone(),
                reason: "named twice in the header".into(),
            });
        }
    }
    no_overlaps(path, &tensors)?;
    let mut raw = len_bytes.to_vec();
    raw.extend_from_slice(&header);
    raw.extend_from_slice(&file_len.to_le_bytes());
    Ok((raw, tensors))
}

/// A header's entries in file order, duplicates kept (a `Map` would keep
/// only the last of two equal names).
struct Entries(Vec<(String, Value)>);

impl<'de> serde::Deserialize<'de> for Entries {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Entries;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Entries, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry::<String, Value>()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }
        d.deserialize_map(Visitor)
    }
}

/// One header entry, validated against the data section.
fn tensor_entry(
    path: &Path,
    name: &str,
    entry: &Value,
    data_len: u64,
    data_start: u64,
) -> Result<TensorInfo, CheckpointError> {
    let tensor_err = |reason: String| CheckpointError::Tensor {
        path: path.to_path_buf(),
        tensor: name.to_string(),
        reason,
    };
    let dtype = entry
        .get("dtype")
        .and_then(Value::as_str)
        .ok_or_else(|| tensor_err("no `dtype`".into()))?;
    let dtype = TensorDtype::parse(dtype)
        .ok_or_else(|| tensor_err(format!("unsupported dtype `{dtype}`")))?;
    let size = dtype.size() as u64;
    let shape: Vec<usize> = entry
        .get("shape")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
        .ok_or_else(|| tensor_err("`shape` is not a list of non-negative integers".into()))?;
    let offsets: Vec<u64> = entry
        .get("data_offsets")
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(Value::as_u64).collect())
        .filter(|o: &Vec<u64>| o.len() == 2)
        .ok_or_else(|| tensor_err("`data_offsets` is not [begin, end]".into()))?;
    let (begin, end) = (offsets[0], offsets[1]);
    if begin > end || end > data_len {
        return Err(tensor_err(format!(
            "data offsets [{begin}, {end}] are outside the data section ({data_len} bytes)"
        )));
    }
    let numel = shape
        .iter()
        .try_fold(1u64, |acc, d| acc.checked_mul(*d as u64));
    let expected = numel.and_then(|n| n.checked_mul(size));
    if expected != Some(end - begin) {
        return Err(tensor_err(format!(
            "{} bytes do not hold a {dtype} tensor of shape {shape:?}",
            end - begin
        )));
    }
    Ok(TensorInfo {
        dtype,
        shape,
        file: path.to_path_buf(),
        offsets: (begin, end),
        data_start,
    })
}

/// No two tensors' bytes overlap.
fn no_overlaps(path: &Path, tensors: &BTreeMap<String, TensorInfo>) -> Result<(), CheckpointError> {
    let mut ranges: Vec<(&String, (u64, u64))> = tensors
        .iter()
        .map(|(n, t)| (n, t.offsets))
        .filter(|(_, (b, e))| e > b)
        .collect();
    ranges.sort_by_key(|(_, r)| *r);
    for pair in ranges.windows(2) {
        if pair[1].1.0 < pair[0].1.1 {
            return Err(CheckpointError::Tensor {
                path: path.to_path_buf(),
                tensor: pair[1].0.clone(),
                reason: format!("its data overlaps tensor `{}`", pair[0].0),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, header: &str, data: usize) -> PathBuf {
        let path = dir.join(name);
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(std::iter::repeat_n(0u8, data));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn validates_headers() {
        let dir = std::env::temp_dir().join(format!("obim-header-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ok = write(
            &dir,
            "ok.safetensors",
            r#"{"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#,
            8,
        );
        assert_eq!(read_header(&ok).unwrap().1["a"].shape, vec![2, 2]);
        let cases = [
            (
                r#"{"a":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}"#,
                4,
                "outside the data section",
            ),
            (
                r#"{"a":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}}"#,
                8,
                "do not hold",
            ),
            (
                r#"{"a":{"dtype":"Q4","shape":[2],"data_offsets":[0,1]}}"#,
                1,
                "unsupported dtype",
            ),
            (
                r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}"#,
                6,
                "overlaps",
            ),
            ("not json", 0, "not valid JSON"),
        ];
        for (header, data, expected) in cases {
            let p = write(&dir, "bad.safetensors", header, data);
            let e = read_header(&p).unwrap_err().to_string();
            assert!(e.contains(expected), "{e}");
        }
        let p = dir.join("short.safetensors");
        std::fs::write(&p, 1000u64.to_le_bytes()).unwrap();
        assert!(
            read_header(&p)
                .unwrap_err()
                .to_string()
                .contains("larger than the file")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
