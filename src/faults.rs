//! Fault injection for the crash tests: a named point before and after
//! every durable write (`durable::atomic_write`, `durable::append_line`) where the
//! process can be made to die as `kill -9` would (`std::process::abort`: no
//! destructors, no flushing).
//!
//! `EFFRANK_FAULT=<kind>:<when>[@<n>]` aborts at the n-th time (default the
//! first) this process reaches that point. `<when>` is `before` or `after`
//! the write, or, for appended files, `torn`: half the line is written and
//! synced, then the process aborts (a crash in the middle of an append);
//! `<kind>` is the file's role, from its name:
//!
//! | kind | files |
//! |---|---|
//! | `results` | `results*.jsonl` |
//! | `metrics` | `metrics.jsonl` |
//! | `checkpoint` | `model.safetensors` |
//! | `state` | `state.safetensors` |
//! | `teacher-cache` | `cache/teacher-logits-*.f32` |
//! | `claim` | `running.json` |
//! | `summary` | `summary.json`, `sweep-summary-*.json` |
//! | `report` | `analysis.json`, `summary.md`, `*.png`, `spectrum.json` |
//! | `file` | anything else |
//!
//! Without the variable a fault point costs one comparison.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

/// The environment variable that arms a fault point.
pub const FAULT_VAR: &str = "EFFRANK_FAULT";

/// Every fault point name, for tests that visit them all.
pub const KINDS: [&str; 9] = [
    "results",
    "metrics",
    "checkpoint",
    "state",
    "teacher-cache",
    "claim",
    "summary",
    "report",
    "file",
];

/// The role of a durable file, from its name (the table in the module doc).
pub fn kind_of(path: &Path) -> &'static str {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    match name {
        "model.safetensors" => "checkpoint",
        "state.safetensors" => "state",
        "metrics.jsonl" => "metrics",
        "running.json" => "claim",
        "summary.json" => "summary",
        "analysis.json" | "summary.md" | "spectrum.json" => "report",
        _ if name.starts_with("results") && name.ends_with(".jsonl") => "results",
        _ if name.starts_with("teacher-logits-") => "teacher-cache",
        _ if name.starts_with("sweep-summary-") => "summary",
        _ if name.ends_with(".png") => "report",
        _ => "file",
    }
}

/// The armed point and the hit that fires, parsed once.
fn armed() -> &'static Option<(String, usize)> {
    static ARMED: OnceLock<Option<(String, usize)>> = OnceLock::new();
    ARMED.get_or_init(|| {
        let spec = std::env::var(FAULT_VAR).ok()?;
        let (name, nth) = match spec.split_once('@') {
            Some((n, k)) => (n.to_string(), k.trim().parse().unwrap_or(1)),
            None => (spec, 1),
        };
        Some((name.trim().to_string(), nth.max(1)))
    })
}

/// A fault point `<kind of path>:<when>`: aborts the process when it is the
/// armed one and this is its n-th hit.
pub fn point(when: &str, path: &Path) {
    if fires(when, path) {
        abort_at(when, path);
    }
}

/// The `torn` fault point of an append of `bytes` to `file`: when armed,
/// writes the first half of `bytes`, syncs, and aborts.
pub fn tear(file: &mut std::fs::File, bytes: &[u8], path: &Path) {
    use std::io::Write;
    if fires("torn", path) {
        let _ = file.write_all(&bytes[..bytes.len() / 2]);
        let _ = file.sync_all();
        abort_at("torn", path);
    }
}

fn abort_at(when: &str, path: &Path) -> ! {
    eprintln!(
        "fault injection: aborting at {}:{when} on {}",
        kind_of(path),
        path.display()
    );
    std::process::abort();
}

/// True when `<kind of path>:<when>` is armed and this is the hit that fires.
fn fires(when: &str, path: &Path) -> bool {
    let Some((name, nth)) = armed() else {
        return false;
    };
    let here = format!("{}:{when}", kind_of(path));
    if &here != name {
        return false;
    }
    static HITS: Mutex<Option<HashMap<String, usize>>> = Mutex::new(None);
    let hit = {
        let mut hits = HITS.lock().unwrap_or_else(|e| e.into_inner());
        let count = hits
            .get_or_insert_with(HashMap::new)
            .entry(here.clone())
            .or_insert(0);
        *count += 1;
        *count
    };
    hit == *nth
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_map_to_their_kinds() {
        let cases = [
            ("out/results.jsonl", "results"),
            ("out/results-shard1of4.jsonl", "results"),
            ("out/runs/r8-s0/metrics.jsonl", "metrics"),
            ("out/runs/r8-s0/model.safetensors", "checkpoint"),
            ("out/runs/r8-s0/state.safetensors", "state"),
            ("out/cache/teacher-logits-00ff-s0-e3.f32", "teacher-cache"),
            ("out/runs/r8-s0/running.json", "claim"),
            ("out/sweep-summary-shard0of1.json", "summary"),
            ("out/plot.png", "report"),
            ("student-r8.safetensors", "file"),
        ];
        for (path, kind) in cases {
            assert_eq!(kind_of(Path::new(path)), kind, "{path}");
            assert!(KINDS.contains(&kind));
        }
    }
}
