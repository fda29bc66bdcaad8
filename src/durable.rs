//! Durable files. Two kinds, and how each survives a crash:
//!
//! - Files written whole (checkpoints, training state, summaries, reports,
//!   claims, teacher-logit caches) go through `atomic_write`: a temporary
//!   file in the same folder, fsync, rename over the target, fsync of the
//!   folder. A crash leaves the old file or the new one, never a mix.
//! - Append-only files (`results*.jsonl`, `metrics.jsonl`) take one JSON
//!   line per record, written by `append_line` in a single `write` and
//!   fsynced. A crash mid-write can leave an incomplete last line (no
//!   newline). `append_line` cuts such a tail off before appending, with a
//!   warning naming the file, so the next record starts on a line of its
//!   own; `read_jsonl` skips it, with the same warning. The record it would
//!   have been is missing, so the work behind it is done again. A malformed
//!   line anywhere else is an error naming the file and the line.

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// The folder of `path` ("." for a bare file name).
fn folder_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// fsync a folder, so that a rename or a new file in it survives a crash.
fn sync_folder(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing folder {}", dir.display()))
}

/// Create the output folder `path` (and its parents), with an error that
/// says what is in the way: a file of that name, or a folder that cannot be
/// written.
pub fn create_folder(path: &Path) -> Result<()> {
    if path.exists() && !path.is_dir() {
        bail!(
            "{} exists and is not a folder; give an output folder",
            path.display()
        );
    }
    std::fs::create_dir_all(path)
        .with_context(|| format!("cannot create the output folder {}", path.display()))?;
    let probe = path.join(format!(".effrank-write-test.{}", std::process::id()));
    std::fs::write(&probe, b"")
        .with_context(|| format!("the output folder {} is not writable", path.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Write `bytes` to `path` atomically (temporary file, fsync, rename, fsync of the folder).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |tmp| {
        let mut f =
            std::fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Write `path` atomically as `atomic_write` does, the temporary file
/// created and filled by `fill` (a writer that streams: no whole copy of
/// the file in memory).
pub fn atomic_write_with(path: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = folder_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    if path.is_dir() {
        bail!("cannot write {}: it is a folder", path.display());
    }
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    // Unique per call, not only per process: two threads of one process may
    // write the same file at once (a claim's heartbeat and its epoch update),
    // and a shared temporary name would let one rename the other's file away.
    static SEQUENCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{seq}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        fill(&tmp)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        crate::faults::point("before", path);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written?;
    sync_folder(dir)?;
    crate::faults::point("after", path);
    Ok(())
}

/// Length of the complete lines at the start of `bytes` (up to and
/// including the last newline).
fn complete_len(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)
}

fn warn_torn(path: &Path, tail: usize, action: &str) {
    eprintln!("warning: {}: its last line is incomplete ({tail} bytes without a newline, from an interrupted write); {action}", path.display());
}

static APPENDS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Append one line to `path` durably: cut an incomplete last line off first
/// (see the module doc), then a single `write` of the whole line on a file
/// opened in append mode (atomic with respect to other appenders on a local
/// file system), then fsync.
pub fn append_line(path: &Path, line: &str) -> Result<()> {
    // Students trained at once append from several threads: one append at
    // a time, so that one's torn-tail check never sees another's write.
    let _one_at_a_time = APPENDS.lock().unwrap_or_else(|e| e.into_inner());
    let dir = folder_of(path);
    std::fs::create_dir_all(dir).with_context(|| format!("creating folder {}", dir.display()))?;
    let existed = path.exists();
    if existed {
        cut_torn_tail(path)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {} for appending", path.display()))?;
    let mut buf = line.trim_end_matches('\n').to_string();
    if buf.contains('\n') {
        bail!("appending to {}: a record must be one line", path.display());
    }
    buf.push('\n');
    crate::faults::point("before", path);
    crate::faults::tear(&mut f, buf.as_bytes(), path);
    f.write_all(buf.as_bytes())
        .with_context(|| format!("appending to {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    if !existed {
        sync_folder(dir)?;
    }
    crate::faults::point("after", path);
    Ok(())
}

/// Truncate `path` to its complete lines, warning when that removes anything.
fn cut_torn_tail(path: &Path) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let len = f
        .metadata()
        .with_context(|| format!("reading the size of {}", path.display()))?
        .len();
    // A record is far shorter than this; read back no more than needed to
    // find the last newline.
    let window = len.min(1 << 20);
    f.seek(SeekFrom::Start(len - window))
        .with_context(|| format!("reading {}", path.display()))?;
    let mut tail = Vec::with_capacity(window as usize);
    f.read_to_end(&mut tail)
        .with_context(|| format!("reading {}", path.display()))?;
    if tail.last().is_none_or(|&b| b == b'\n') {
        return Ok(());
    }
    let keep = match tail.iter().rposition(|&b| b == b'\n') {
        Some(i) => len - window + i as u64 + 1,
        None if window == len => 0,
        None => bail!("{}: its last line is over 1 MiB long without a newline; this is not a file the engine appended to", path.display()),
    };
    warn_torn(
        path,
        (len - keep) as usize,
        "cutting it off; the record it would have held is redone",
    );
    f.set_len(keep)
        .with_context(|| format!("truncating {}", path.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", path.display()))
}

/// Every record of an append-only JSON-lines file, in order. An incomplete
/// last line is skipped with a warning (the file is not changed); a line
/// that does not parse as `T` is an error naming the file and line, with
/// `what` saying what the line should have been ("a results record").
/// Blank lines are ignored.
pub fn read_jsonl<T: DeserializeOwned>(path: &Path, what: &str) -> Result<Vec<T>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let complete = complete_len(&bytes);
    if complete < bytes.len() {
        warn_torn(path, bytes.len() - complete, "ignoring it");
    }
    let text = std::str::from_utf8(&bytes[..complete])
        .with_context(|| format!("{}: not UTF-8 text", path.display()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record = serde_json::from_str(line)
            .with_context(|| format!("{} line {}: not {what}", path.display(), i + 1))?;
        out.push(record);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1);
        assert!(
            atomic_write(dir.path(), b"x").is_err(),
            "a folder as the target"
        );
    }

    /// Threads of one process writing the same file at once (a claim's
    /// heartbeat thread and its epoch update) each succeed, and the file
    /// holds one whole write.
    #[test]
    fn threads_writing_one_file_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("running.json");
        let texts: Vec<String> = (0..4)
            .map(|t| format!("writer {t} ").repeat(4096))
            .collect();
        std::thread::scope(|s| {
            for text in &texts {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..50 {
                        atomic_write(p, text.as_bytes()).unwrap();
                    }
                });
            }
        });
        let last = std::fs::read_to_string(&p).unwrap();
        assert!(texts.contains(&last), "the file is one writer's whole text");
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn append_line_appends_whole_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        append_line(&p, "{\"a\":1}").unwrap();
        append_line(&p, "{\"a\":2}\n").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n"
        );
        assert!(
            append_line(&p, "{\"a\":\n3}").is_err(),
            "two lines as one record"
        );
    }

    #[test]
    fn a_torn_last_line_is_cut_off_before_the_next_append_and_skipped_by_readers() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        let torn = "{\"a\":1}\n{\"a\":2}\n{\"a\":3";
        std::fs::write(&p, torn).unwrap();
        let read: Vec<serde_json::Value> = read_jsonl(&p, "a record").unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            torn,
            "readers leave the file alone"
        );
        append_line(&p, "{\"a\":4}").unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            "{\"a\":1}\n{\"a\":2}\n{\"a\":4}\n"
        );
        // A file that is nothing but a torn line.
        std::fs::write(&p, "{\"a\"").unwrap();
        append_line(&p, "{\"a\":5}").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"a\":5}\n");
    }

    #[test]
    fn a_malformed_complete_line_is_an_error_naming_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.jsonl");
        std::fs::write(&p, "{\"a\":1}\nnot json\n{\"a\":3}\n").unwrap();
        let e = format!(
            "{:#}",
            read_jsonl::<serde_json::Value>(&p, "a record").unwrap_err()
        );
        assert!(e.contains("r.jsonl line 2: not a record"), "{e}");
    }
}
