//! An output file written around the page cache. On Linux a shard is opened
//! with `O_DIRECT` and written from a 4096-byte-aligned buffer, so the disk
//! takes the bytes straight from obim's memory: no copy into the page cache,
//! which on a busy machine costs from 0.3 to 2 CPU-seconds per GB from one
//! run to the next (docs/internals.md, Benchmark). Where the file system
//! refuses `O_DIRECT` (tmpfs, some network file systems), at open or at the
//! first write, the file is written through the page cache instead, with
//! the kernel asked to start writing every 32 MiB so that the final fsync
//! has little left to do.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Alignment of direct writes: buffer address, file offset and length.
const ALIGN: usize = 4096;
/// Bytes gathered before a direct write.
const BUFFER: usize = 8 << 20;
/// Bytes between writeback requests when writing through the page cache.
const WRITEBACK_STEP: u64 = 32 << 20;

/// A file being written front to back; [`Sink::finish`] makes it durable.
pub struct Sink {
    path: PathBuf,
    how: How,
    /// Bytes accepted so far: the file's length once finished.
    written: u64,
}

enum How {
    Direct {
        file: File,
        /// `BUFFER + ALIGN` bytes, of which `at..at + BUFFER` are aligned.
        buf: Vec<u8>,
        at: usize,
        filled: usize,
        /// Bytes already on disk (a multiple of `ALIGN`).
        on_disk: u64,
    },
    Cached {
        file: BufWriter<File>,
        handed_back: u64,
    },
}

impl Sink {
    /// Creates (or truncates) `path`, direct where the file system allows.
    pub fn create(path: &Path) -> io::Result<Sink> {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(libc::O_DIRECT)
                .open(path);
            if let Ok(file) = direct {
                let buf = vec![0u8; BUFFER + ALIGN];
                let at = buf.as_ptr().align_offset(ALIGN);
                return Ok(Sink {
                    path: path.to_path_buf(),
                    how: How::Direct {
                        file,
                        buf,
                        at,
                        filled: 0,
                        on_disk: 0,
                    },
                    written: 0,
                });
            }
        }
        Self::cached(path)
    }

    /// Creates `path` written through the page cache.
    fn cached(path: &Path) -> io::Result<Sink> {
        Ok(Sink {
            path: path.to_path_buf(),
            how: How::Cached {
                file: BufWriter::with_capacity(1 << 20, File::create(path)?),
                handed_back: 0,
            },
            written: 0,
        })
    }

    /// Whether the file is written around the page cache.
    pub fn is_direct(&self) -> bool {
        matches!(self.how, How::Direct { .. })
    }

    /// Appends `data`: into the aligned buffer, written out each time it
    /// fills, or through the page cache after a fall-back.
    pub fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        self.written += data.len() as u64;
        while !data.is_empty() {
            match &mut self.how {
                How::Cached { file, handed_back } => {
                    file.write_all(data)?;
                    if self.written - *handed_back >= WRITEBACK_STEP {
                        file.flush()?;
                        start_writeback(file.get_ref(), *handed_back, self.written);
                        *handed_back = self.written;
                    }
                    return Ok(());
                }
                How::Direct {
                    buf, at, filled, ..
                } => {
                    let n = (BUFFER - *filled).min(data.len());
                    buf[*at + *filled..][..n].copy_from_slice(&data[..n]);
                    *filled += n;
                    data = &data[n..];
                    if *filled == BUFFER {
                        self.write_buffer(BUFFER)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes the buffer's first `len` bytes (a multiple of `ALIGN`)
    /// directly; where the file system refuses, goes on through the page
    /// cache from the last byte on disk.
    fn write_buffer(&mut self, len: usize) -> io::Result<()> {
        let How::Direct {
            file,
            buf,
            at,
            filled,
            on_disk,
        } = &mut self.how
        else {
            return Ok(());
        };
        match file.write_all(&buf[*at..*at + len]) {
            Ok(()) => {
                *on_disk += len as u64;
                // The padding of the last block is all that can pass `filled`.
                let rest = filled.saturating_sub(len);
                buf.copy_within(*at + len..*at + len + rest, *at);
                *filled = rest;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.fall_back(),
            Err(e) => Err(e),
        }
    }

    /// Reopens the file through the page cache at the last byte written
    /// directly and hands it what the buffer holds.
    fn fall_back(&mut self) -> io::Result<()> {
        let How::Direct {
            buf,
            at,
            filled,
            on_disk,
            ..
        } = &self.how
        else {
            return Ok(());
        };
        let pending = buf[*at..*at + *filled].to_vec();
        let on_disk = *on_disk;
        // Direct writes are whole blocks from the start: the file ends at
        // `on_disk`.
        let mut file = OpenOptions::new().write(true).open(&self.path)?;
        file.seek(SeekFrom::Start(on_disk))?;
        let mut file = BufWriter::with_capacity(1 << 20, file);
        file.write_all(&pending)?;
        self.how = How::Cached {
            file,
            handed_back: on_disk,
        };
        Ok(())
    }

    /// Writes what is left and waits until the file is on disk.
    pub fn finish(mut self) -> io::Result<()> {
        if let How::Direct {
            buf, at, filled, ..
        } = &mut self.how
        {
            // The last block is written whole, zero-padded, then cut back.
            let padded = filled.div_ceil(ALIGN) * ALIGN;
            buf[*at + *filled..*at + padded].fill(0);
            self.write_buffer(padded)?;
        }
        match self.how {
            How::Direct { file, .. } => {
                file.set_len(self.written)?;
                file.sync_all()
            }
            How::Cached { file, .. } => {
                let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
                file.sync_all()
            }
        }
    }
}

/// Asks the kernel to start writing bytes `from..to` of `file` to disk now,
/// without waiting (Linux; elsewhere the final fsync does it all).
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a plain syscall on an open descriptor with in-range
        // offsets; it only schedules writeback, and an error is harmless
        // (the final fsync still writes everything and reports failures).
        #[expect(unsafe_code, reason = "sync_file_range has no safe wrapper in std")]
        let _ = unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of awkward sizes: a header, odd lengths, one longer than the
    /// buffer, an empty one, a last block that is not whole.
    fn pieces() -> Vec<Vec<u8>> {
        let mut state = 7u32;
        [8, 12_345, 0, BUFFER + 3 * ALIGN + 17, 1, ALIGN, 3]
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|_| {
                        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (state >> 24) as u8
                    })
                    .collect()
            })
            .collect()
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("obim-sink-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// Direct where the temporary directory's file system allows it,
    /// through the page cache, and switching from one to the other half
    /// way: the file holds exactly the bytes written.
    #[test]
    fn every_way_writes_the_same_bytes() {
        let dir = dir("ways");
        let pieces = pieces();
        let want: Vec<u8> = pieces.concat();
        for way in ["direct", "cached", "fall back"] {
            let path = dir.join(way.replace(' ', "_"));
            let mut sink = match way {
                "cached" => Sink::cached(&path),
                _ => Sink::create(&path),
            }
            .expect("create");
            if way == "direct" && !sink.is_direct() {
                println!(
                    "{}: no O_DIRECT here; tested through the page cache",
                    dir.display()
                );
            }
            for (i, piece) in pieces.iter().enumerate() {
                if way == "fall back" && i == 4 {
                    sink.fall_back().expect("fall back");
                    assert!(!sink.is_direct());
                }
                sink.write_all(piece).expect("write");
            }
            sink.finish().expect("finish");
            let got = std::fs::read(&path).expect("read back");
            assert_eq!(got.len(), want.len(), "{way}");
            assert!(got == want, "{way}: different bytes");
        }
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    /// Creating truncates a longer file that was there.
    #[test]
    fn creating_truncates() {
        let dir = dir("truncate");
        let path = dir.join("f");
        std::fs::write(&path, vec![1u8; 3 * ALIGN]).expect("write");
        let mut sink = Sink::create(&path).expect("create");
        sink.write_all(b"abc").expect("write");
        sink.finish().expect("finish");
        assert_eq!(std::fs::read(&path).expect("read"), b"abc");
        std::fs::remove_dir_all(&dir).expect("clean up");
    }
}
