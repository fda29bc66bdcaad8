//! No crash corrupts a sweep: the sweep is killed at every named fault point
//! (`src/faults.rs`: before and after every durable write, by
//! `std::process::abort`, as `kill -9` would) and by plain SIGKILLs at
//! seeded random moments; each time it is run again, and in the end its
//! results equal an uninterrupted run's exactly, with no more than each
//! interrupted rank's current epoch lost to any one crash (the sweep trains
//! two small students at once here, `--parallel auto` on two threads).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_effrank-engine");
const DATA: [&str; 4] = ["--data", "demo", "--demo-images", "400"];
const SIGABRT: i32 = 6;

fn sweep_command(out: &Path, ranks: &str, epochs: &str) -> Command {
    let mut c = Command::new(BIN);
    c.args([
        "sweep",
        "--teacher",
        teacher().to_str().unwrap(),
        "--ranks",
        ranks,
        "--epochs",
        epochs,
        "--lr",
        "2e-3",
        "--device",
        "cpu",
        "--quiet",
        "--heartbeat",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    c.args(DATA);
    c
}

fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn teacher() -> &'static Path {
    static T: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = T.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("teacher");
        let status = Command::new(BIN)
            .args([
                "train",
                "--model",
                "vit-demo",
                "--epochs",
                "2",
                "--lr",
                "2e-3",
                "--device",
                "cpu",
                "--quiet",
                "--out",
                out.to_str().unwrap(),
            ])
            .args(DATA)
            .status()
            .unwrap();
        assert!(status.success());
        (dir, out.join("model.safetensors"))
    });
    path
}

/// (rank, seed) → (top-1, top-5) as bits.
type Results = BTreeMap<(u64, u64), (u64, u64)>;

/// Every student record, and the number of student records (duplicates
/// would show there).
fn results(dir: &Path) -> (Results, usize) {
    let (mut map, mut n) = (BTreeMap::new(), 0);
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("results") && name.ends_with(".jsonl")) {
            continue;
        }
        for line in std::fs::read_to_string(&path).unwrap().lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| {
                panic!(
                    "{}: a line that does not parse ({e}): {line}",
                    path.display()
                )
            });
            if v["kind"] == "student" {
                n += 1;
                let bits = |k: &str| v[k].as_f64().unwrap().to_bits();
                map.insert(
                    (v["rank"].as_u64().unwrap(), v["seed"].as_u64().unwrap()),
                    (bits("top1"), bits("top5")),
                );
            }
        }
    }
    (map, n)
}

/// Epochs trained (lines in metrics.jsonl) and epochs committed (the
/// training state) of every job folder.
fn progress(dir: &Path) -> Vec<(String, usize, usize)> {
    let runs = dir.join("runs");
    let Ok(entries) = std::fs::read_dir(&runs) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in entries {
        let job = e.unwrap().path();
        let metrics = std::fs::read_to_string(job.join("metrics.jsonl")).unwrap_or_default();
        let trained = metrics
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .count();
        let committed = match std::fs::read(job.join("state.safetensors")) {
            Ok(bytes) => {
                let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                meta.metadata().as_ref().unwrap()["epoch"].parse().unwrap()
            }
            Err(_) => 0,
        };
        out.push((
            job.file_name().unwrap().to_string_lossy().to_string(),
            trained,
            committed,
        ));
    }
    out
}

/// The most epochs any one job trained but did not commit: what a crash
/// cost it. Students trained at once (`--parallel`) each lose at most the
/// epoch they were in.
fn lost_epochs(dir: &Path) -> usize {
    progress(dir)
        .iter()
        .map(|(_, trained, committed)| trained.saturating_sub(*committed))
        .max()
        .unwrap_or(0)
}

fn reference() -> &'static Results {
    static R: OnceLock<(tempfile::TempDir, Results)> = OnceLock::new();
    &R.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let out = sweep_command(dir.path(), "2,8", "3").output().unwrap();
        assert!(out.status.success(), "{}", output_text(&out));
        let (map, n) = results(dir.path());
        assert_eq!((map.len(), n), (2, 2));
        (dir, map)
    })
    .1
}

/// Run the sweep to completion in `dir`, expecting the results to match the reference.
fn finish_and_compare(dir: &Path, what: &str) {
    let out = sweep_command(dir, "2,8", "3").output().unwrap();
    assert!(
        out.status.success(),
        "{what}: the resumed sweep failed:\n{}",
        output_text(&out)
    );
    let (map, n) = results(dir);
    assert_eq!(
        &map,
        reference(),
        "{what}: the resumed results differ from an uninterrupted run"
    );
    assert_eq!(n, map.len(), "{what}: a job was recorded twice");
}

#[test]
fn every_fault_point_is_survived() {
    reference();
    // (point, which hit): hits after the first land mid-job, between epochs.
    let points: &[(&str, usize)] = &[
        ("claim:before", 1),
        ("claim:after", 1),
        ("claim:after", 3),
        ("teacher-cache:before", 1),
        ("teacher-cache:after", 2),
        ("checkpoint:before", 1),
        ("checkpoint:after", 2),
        ("metrics:before", 2),
        ("metrics:after", 1),
        ("metrics:after", 4),
        ("state:before", 3),
        ("state:after", 2),
        ("metrics:torn", 2),
        ("results:torn", 1),
        ("results:torn", 2),
        ("results:before", 1),
        ("results:before", 2),
        ("results:after", 1),
        ("results:after", 3),
        ("summary:before", 1),
        ("summary:after", 1),
        ("report:before", 1),
        ("report:after", 2),
    ];
    let mut survived = 0;
    for &(point, hit) in points {
        let what = format!("{point}@{hit}");
        let dir = tempfile::tempdir().unwrap();
        let out = sweep_command(dir.path(), "2,8", "3")
            .env("EFFRANK_FAULT", &what)
            .output()
            .unwrap();
        assert_eq!(
            out.status.signal(),
            Some(SIGABRT),
            "{what}: the fault point was not reached (status {:?}):\n{}",
            out.status,
            output_text(&out)
        );
        let lost = lost_epochs(dir.path());
        assert!(
            lost <= 1,
            "{what}: a job lost {lost} epochs (trained, committed): {:?}",
            progress(dir.path())
        );
        finish_and_compare(dir.path(), &what);
        survived += 1;
    }
    println!("{survived} fault points survived");
}

/// A tiny seeded generator for the kill times (no extra crates).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

#[test]
fn ten_sigkills_at_random_moments_lose_nothing() {
    reference();
    let dir = tempfile::tempdir().unwrap();
    let mut rng = XorShift(0x5eed_1234_abcd_0001);
    let mut kills = 0;
    let started = Instant::now();
    while kills < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "took too long"
        );
        let mut child = sweep_command(dir.path(), "2,8", "3")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Between 0.15 and 0.9 s after the start: after loading, in training.
        let delay = Duration::from_millis(150 + rng.next() % 750);
        let until = Instant::now() + delay;
        let mut exited = None;
        while Instant::now() < until {
            if let Some(status) = child.try_wait().unwrap() {
                exited = Some(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        match exited {
            Some(status) => {
                assert!(
                    status.success(),
                    "the sweep failed after {kills} kills: {status:?}"
                );
                // It finished before this kill: start the same work again in a fresh folder.
                finish_and_compare(dir.path(), &format!("after {kills} kills"));
                std::fs::remove_dir_all(dir.path()).unwrap();
                std::fs::create_dir_all(dir.path()).unwrap();
            }
            None => {
                child.kill().unwrap();
                child.wait().unwrap();
                kills += 1;
                let lost = lost_epochs(dir.path());
                assert!(
                    lost <= 1,
                    "kill {kills}: a job lost {lost} epochs (trained, committed): {:?}",
                    progress(dir.path())
                );
            }
        }
    }
    finish_and_compare(dir.path(), "after 10 kills");
    println!("{kills} SIGKILLs survived");
}
