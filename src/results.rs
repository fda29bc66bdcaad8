//! The results of a sweep on disk: the record schema and the reading of a
//! results folder, shared by the sweep (which appends records and skips
//! finished jobs) and the analysis (which reads them).
//!
//! A results folder holds `results.jsonl` (one process) or
//! `results-shard<I>of<N>.jsonl` (one file per shard, so shards on
//! different machines never write the same file). Each line is one JSON
//! `Record`, appended durably (`durable::append_line`: a torn last line from a
//! crash is cut off, and its work redone).

use crate::durable::{append_line, read_jsonl};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One line of a results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Record {
    Student(StudentRecord),
    Teacher(TeacherRecord),
}

/// A finished (rank, seed) or (budget, seed) job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StudentRecord {
    pub rank: usize,
    pub seed: u64,
    pub top1: f64,
    pub top5: f64,
    pub params: usize,
    pub teacher_params: usize,
    pub compression: f64,
    pub epochs: usize,
    pub wall_s: f64,
    pub host: String,
    /// Every setting of the sweep that shapes a student (`SweepOptions`
    /// serialized whole, so a new option cannot be left out).
    pub settings: serde_json::Value,
    /// The epoch an interrupted job resumed after (0: trained in one go).
    #[serde(default)]
    pub resumed_from_epoch: usize,
    /// A budget student's: how its ranks were chosen (`sweep --budgets`;
    /// its `rank` is then 0, its ranks are per layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<Box<crate::factorize::budget::AllocationRecord>>,
    /// A budget student's rank of every layer (None: a dense layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranks: Option<crate::model::params::Ranks>,
}

impl StudentRecord {
    /// The parameter budget of a budget student (`sweep --budgets`).
    pub fn budget(&self) -> Option<usize> {
        self.allocation.as_ref().map(|a| a.budget_params)
    }
}

/// The teacher's accuracy on the same test set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TeacherRecord {
    pub top1: f64,
    pub top5: f64,
    pub params: usize,
}

/// Every `results*.jsonl` file in `out`, sorted by name.
pub fn results_files(out: &Path) -> Result<Vec<PathBuf>> {
    if !out.exists() {
        return Ok(Vec::new());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with("results") && name.ends_with(".jsonl") && p.is_file()
        })
        .collect();
    files.sort();
    Ok(files)
}

/// Every record of every results file in `out`, file by file in name order.
pub fn read_records(out: &Path) -> Result<Vec<Record>> {
    let mut records = Vec::new();
    for file in results_files(out)? {
        records.extend(read_records_file(&file)?);
    }
    Ok(records)
}

/// Every record of one results file: a malformed line is an error naming the
/// file and line; an incomplete last line (a writer killed mid-write) is
/// skipped with a warning.
pub fn read_records_file(file: &Path) -> Result<Vec<Record>> {
    read_jsonl(file, "a results record")
}

/// Append a record to a results file (one durable line).
pub fn append_record(path: &Path, record: &Record) -> Result<()> {
    append_line(path, &serde_json::to_string(record)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn student(rank: usize) -> StudentRecord {
        StudentRecord {
            rank,
            seed: 0,
            top1: 0.5,
            top5: 0.9,
            params: 10,
            teacher_params: 100,
            compression: 10.0,
            epochs: 1,
            wall_s: 1.0,
            host: "h".into(),
            settings: serde_json::json!({}),
            resumed_from_epoch: 0,
            allocation: None,
            ranks: None,
        }
    }

    #[test]
    fn records_round_trip_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("results.jsonl");
        append_record(&file, &Record::Student(student(4))).unwrap();
        append_record(
            &file,
            &Record::Teacher(TeacherRecord {
                top1: 0.7,
                top5: 0.95,
                params: 100,
            }),
        )
        .unwrap();
        let read = read_records(dir.path()).unwrap();
        assert_eq!(read[0], Record::Student(student(4)));
        std::fs::write(
            dir.path().join("results-shard0of2.jsonl"),
            "{\"kind\":\"student\"}\n",
        )
        .unwrap();
        let e = format!("{:#}", read_records(dir.path()).unwrap_err());
        assert!(e.contains("results-shard0of2.jsonl line 1"), "{e}");
    }

    #[test]
    fn a_torn_last_line_is_skipped_and_cut_off_by_the_next_append() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("results.jsonl");
        std::fs::write(
            &file,
            "{\"kind\":\"teacher\",\"top1\":0.7,\"top5\":0.9,\"params\":5}\n{\"kind\":\"stu",
        )
        .unwrap();
        assert_eq!(read_records(dir.path()).unwrap().len(), 1);
        append_record(&file, &Record::Student(student(8))).unwrap();
        assert_eq!(
            read_records(dir.path()).unwrap().len(),
            2,
            "the next record lands on a line of its own"
        );
    }

    #[test]
    fn records_written_before_the_resume_field_still_read() {
        let old = r#"{"kind":"student","rank":2,"seed":0,"top1":0.5,"top5":0.9,"params":10,"teacher_params":100,"compression":10.0,"epochs":1,"wall_s":1.0,"host":"h","settings":{}}"#;
        let r: Record = serde_json::from_str(old).unwrap();
        assert!(matches!(
            r,
            Record::Student(StudentRecord {
                resumed_from_epoch: 0,
                ..
            })
        ));
    }
}
