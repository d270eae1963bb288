//! Where an output is written: a staging directory beside its final place,
//! renamed into place when complete ([`Staging`]); the lock that keeps two
//! runs from writing one output ([`OutputLock`]); what killed runs left
//! behind, cleared under that lock.

use crate::tensors::TensorError;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A directory being written beside its final place: removed if dropped
/// before [`Staging::commit`], so a failed or interrupted run leaves no half
/// output and the previous output intact. It holds the output's
/// [`OutputLock`] from creation until it is committed or dropped.
///
/// Beside the output `NAME` it uses `.NAME.obim-partial-PID` (the new
/// output being written) and `.NAME.obim-old-PID` (the replaced output
/// while it is removed). A process killed with SIGKILL, or a machine that
/// stops, leaves them behind; the next staging of the same output removes
/// every one of them once it holds the lock. A run that is alive holds the
/// lock, so whatever it finds is left by a run that is no longer writing.
/// This is used rather than asking whether the PID in the name is still
/// alive: PIDs are reused, and a directory shared between containers or
/// machines sees PIDs of other process namespaces.
pub struct Staging {
    target: PathBuf,
    temp: PathBuf,
    committed: bool,
    /// Released (and its file removed) after the staging directory is
    /// gone: `Drop::drop` runs before the fields are dropped.
    _lock: OutputLock,
}

/// The replaced output, when it could not be removed after the new output
/// was committed: the new output is in place all the same.
#[derive(Debug, thiserror::Error)]
#[error(
    "the replaced output could not be removed and is left at `{path}` (the next run into the same output removes it, or delete it by hand)"
)]
pub struct Leftover {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl Staging {
    /// Stages `target`, taking its lock.
    pub fn new(target: &Path, force: bool) -> Result<Staging, TensorError> {
        Staging::locked(OutputLock::acquire(target)?, force)
    }

    /// Stages the output whose lock the caller took (a run locks all its
    /// outputs before it computes anything); the lock is released when the
    /// staging is committed or dropped.
    pub fn locked(lock: OutputLock, force: bool) -> Result<Staging, TensorError> {
        let target = lock.target.clone();
        remove_stale(&target);
        // `symlink_metadata`: a dangling link is something at the path too.
        if target.symlink_metadata().is_ok() && !force {
            return Err(TensorError::OutputExists(target));
        }
        let temp = beside(&target, &format!("obim-partial-{}", std::process::id()));
        std::fs::create_dir(&temp).map_err(|source| TensorError::Write {
            path: temp.clone(),
            source,
        })?;
        Ok(Staging {
            target,
            temp,
            committed: false,
            _lock: lock,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.temp
    }

    /// Moves the finished directory into place. Whatever was at the target
    /// (an output, a file) is moved aside first, put back if the new output
    /// cannot be moved in, and removed once it is. Once the new output is
    /// in place this never fails: an old output that cannot be removed is
    /// returned as a [`Leftover`] for the caller to warn about.
    pub fn commit(mut self) -> Result<Option<Leftover>, TensorError> {
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|source| TensorError::Rename {
                from: from.to_path_buf(),
                to: to.to_path_buf(),
                source,
            })
        };
        let aside = if self.target.symlink_metadata().is_ok() {
            let aside = beside(&self.target, &format!("obim-old-{}", std::process::id()));
            rename(&self.target, &aside)?;
            Some(aside)
        } else {
            None
        };
        if let Err(e) = rename(&self.temp, &self.target) {
            if let Some(aside) = &aside {
                let _ = std::fs::rename(aside, &self.target);
            }
            return Err(e);
        }
        self.committed = true;
        Ok(aside.and_then(|path| {
            remove_any(&path)
                .err()
                .map(|source| Leftover { path, source })
        }))
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.temp);
        }
    }
}

/// The directory an output is written in (`.` for a bare name).
fn parent_of(target: &Path) -> &Path {
    target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// `.NAME.SUFFIX` beside the output `NAME`.
fn beside(target: &Path, suffix: &str) -> PathBuf {
    let name = target
        .file_name()
        .map_or_else(|| "output".into(), |n| n.to_string_lossy().into_owned());
    parent_of(target).join(format!(".{name}.{suffix}"))
}

/// Removes the staging and replaced-output directories that runs into
/// `target` which no longer hold its lock left beside it. Best effort: one
/// that cannot be removed does not stop the run (the next one tries again).
fn remove_stale(target: &Path) {
    let prefixes = [beside(target, "obim-partial-"), beside(target, "obim-old-")];
    let prefixes: Vec<String> = prefixes
        .iter()
        .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
        .collect();
    let Ok(entries) = std::fs::read_dir(parent_of(target)) else {
        return;
    };
    let mut old = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefixes[1].as_str()) {
            old.push(entry.path());
        } else if name.starts_with(prefixes[0].as_str()) {
            let _ = remove_any(&entry.path());
        }
    }
    // A run killed between moving the old output aside and moving the new
    // one in left no output: the old one is put back, not deleted.
    if let [only] = &old[..]
        && target.symlink_metadata().is_err()
    {
        let _ = std::fs::rename(only, target);
        return;
    }
    for path in old {
        let _ = remove_any(&path);
    }
}

/// Removes a directory with its contents, or a file or link.
fn remove_any(path: &Path) -> std::io::Result<()> {
    if path.symlink_metadata()?.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    }
}

/// The exclusive right to write one output: an `flock` on
/// `.NAME.obim-lock` beside it, taken without waiting, so a second run into
/// the same output fails at once instead of replacing the first one's.
/// The lock is released when the process ends however it ends (the kernel
/// drops it), so a killed run never blocks the next. The file is removed
/// on release, while still locked; a run that opened it just before sees
/// it is no longer the file at the path once it gets the lock, and opens
/// the path again.
pub struct OutputLock {
    target: PathBuf,
    path: PathBuf,
    _file: File,
}

/// How many times [`OutputLock::acquire`] opens the lock file again when it
/// was replaced under it, before it gives up as if it were held.
const LOCK_ATTEMPTS: usize = 100;

impl OutputLock {
    /// Takes the lock of `target` (creating the directory it is in), or
    /// fails with [`TensorError::Busy`] when another process holds it.
    pub fn acquire(target: &Path) -> Result<OutputLock, TensorError> {
        let parent = parent_of(target);
        std::fs::create_dir_all(parent).map_err(|source| TensorError::Write {
            path: parent.to_path_buf(),
            source,
        })?;
        let path = beside(target, "obim-lock");
        let werr = |source| TensorError::Write {
            path: path.clone(),
            source,
        };
        let mut pid = None;
        for _ in 0..LOCK_ATTEMPTS {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(werr)?;
            if !try_lock(&file).map_err(werr)? {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut text);
                pid = text.trim().parse().ok();
                break;
            }
            if is_file_at(&file, &path) {
                // For people, and for the message of a run that finds it held.
                let _ = file.set_len(0);
                let _ = writeln!(file, "{}", std::process::id());
                return Ok(OutputLock {
                    target: target.to_path_buf(),
                    path,
                    _file: file,
                });
            }
        }
        Err(TensorError::Busy {
            output: target.to_path_buf(),
            lock: path,
            pid,
        })
    }
}

impl Drop for OutputLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Takes an exclusive `flock` on `file` without waiting: false when
/// another open file (of this or another process) holds it.
#[cfg(unix)]
fn try_lock(file: &File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: a plain syscall on a descriptor `file` keeps open.
    #[expect(unsafe_code, reason = "flock has no safe wrapper in std")]
    let status = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if status == 0 {
        return Ok(true);
    }
    match std::io::Error::last_os_error() {
        e if e.kind() == std::io::ErrorKind::WouldBlock => Ok(false),
        e => Err(e),
    }
}

/// Elsewhere there is no lock (std's `File::try_lock` needs Rust 1.89).
#[cfg(not(unix))]
fn try_lock(_file: &File) -> std::io::Result<bool> {
    Ok(true)
}

/// Whether `file` is still the file at `path` (not removed, or replaced,
/// by the run that held the lock before).
#[cfg(unix)]
fn is_file_at(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_file_at(_file: &File, path: &Path) -> bool {
    path.is_file()
}
