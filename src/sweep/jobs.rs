//! The work of a sweep as a list of independent jobs (rank, seed), how a
//! shard picks its share, which jobs are finished (their records in the
//! results folder, `crate::results`) and which are claimed.
//!
//! A job being trained has a claim file `runs/r<rank>-s<seed>/running.json`
//! naming its host and process, created exclusively and refreshed every
//! epoch; `sweep --status` reads both.

use crate::durable::atomic_write;
use crate::results::{read_records, Record, StudentRecord};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// One student to train: every layer at `rank`, or, for a budget job,
/// the per-layer ranks allocated for `budget` parameters (`rank` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Job {
    pub rank: usize,
    pub seed: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<usize>,
}

impl Job {
    /// The job's own folder (checkpoints, metrics, claim).
    pub fn dir(&self, out: &Path) -> PathBuf {
        let name = match self.budget {
            Some(b) => format!("b{b}-s{}", self.seed),
            None => format!("r{}-s{}", self.rank, self.seed),
        };
        out.join("runs").join(name)
    }
}

impl std::fmt::Display for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.budget {
            Some(b) => write!(f, "budget {b} seed {}", self.seed),
            None => write!(f, "rank {} seed {}", self.rank, self.seed),
        }
    }
}

/// Every (budget, seed) pair of a budget sweep, budgets (parameter
/// counts) ascending, then seeds; they follow the rank jobs.
pub fn budget_jobs(budgets: &[usize], seeds: &[u64]) -> Vec<Job> {
    let mut jobs: Vec<Job> = budgets
        .iter()
        .flat_map(|&b| {
            seeds.iter().map(move |&seed| Job {
                rank: 0,
                seed,
                budget: Some(b),
            })
        })
        .collect();
    jobs.sort_by_key(|j| (j.budget, j.seed));
    jobs.dedup();
    jobs
}

/// Every (rank, seed) pair, ranks ascending, then seeds.
pub fn all_jobs(ranks: &[usize], seeds: &[u64]) -> Vec<Job> {
    let mut jobs: Vec<Job> = ranks
        .iter()
        .flat_map(|&rank| {
            seeds.iter().map(move |&seed| Job {
                rank,
                seed,
                budget: None,
            })
        })
        .collect();
    jobs.sort();
    jobs.dedup();
    jobs
}

/// Shard `index` of `count` (0-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parse `I/N` (0 <= I < N).
    pub fn parse(text: &str) -> Result<Shard> {
        let (i, n) = text
            .split_once('/')
            .ok_or_else(|| anyhow!("--shard '{text}': expected I/N, e.g. 0/4"))?;
        let index: usize = i
            .trim()
            .parse()
            .with_context(|| format!("--shard '{text}': '{i}' is not a number"))?;
        let count: usize = n
            .trim()
            .parse()
            .with_context(|| format!("--shard '{text}': '{n}' is not a number"))?;
        if count == 0 || index >= count {
            bail!("--shard '{text}': need 0 <= I < N");
        }
        Ok(Shard { index, count })
    }

    /// The shard a scheduler assigned through the environment: Slurm job
    /// arrays (`SLURM_ARRAY_TASK_ID`, `SLURM_ARRAY_TASK_COUNT`, minus
    /// `SLURM_ARRAY_TASK_MIN` when the array does not start at 0) or
    /// Kubernetes indexed Jobs (`JOB_COMPLETION_INDEX` with the count in
    /// `EFFRANK_SHARD_COUNT`, since Kubernetes does not export it).
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<Shard>> {
        let num =
            |key: &str| -> Result<Option<usize>> {
                match get(key) {
                    None => Ok(None),
                    Some(v) => v.trim().parse().map(Some).with_context(|| {
                        format!("environment variable {key}='{v}' is not a number")
                    }),
                }
            };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let count = num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| {
                anyhow!("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")
            })?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id
                .checked_sub(min)
                .ok_or_else(|| anyhow!("SLURM_ARRAY_TASK_ID {id} < SLURM_ARRAY_TASK_MIN {min}"))?;
            return Shard::parse(&format!("{index}/{count}")).map(Some);
        }
        if let Some(index) = num("JOB_COMPLETION_INDEX")? {
            let count = num("EFFRANK_SHARD_COUNT")?.ok_or_else(|| anyhow!("JOB_COMPLETION_INDEX is set; also set EFFRANK_SHARD_COUNT to the Job's completions"))?;
            return Shard::parse(&format!("{index}/{count}")).map(Some);
        }
        Ok(None)
    }

    /// This shard's jobs: every `count`-th job starting at `index`.
    pub fn select(&self, jobs: &[Job]) -> Vec<Job> {
        jobs.iter()
            .enumerate()
            .filter(|(j, _)| j % self.count == self.index)
            .map(|(_, job)| *job)
            .collect()
    }

    /// The results file this shard appends to.
    pub fn results_file(&self, out: &Path) -> PathBuf {
        if *self == Shard::ALL {
            out.join("results.jsonl")
        } else {
            out.join(format!("results-shard{}of{}.jsonl", self.index, self.count))
        }
    }
}

/// Finished jobs and their records (the first record of a job wins).
pub fn finished(out: &Path) -> Result<BTreeMap<Job, StudentRecord>> {
    let mut done = BTreeMap::new();
    for r in read_records(out)? {
        if let Record::Student(s) = r {
            done.entry(Job {
                rank: s.rank,
                seed: s.seed,
                budget: s.budget(),
            })
            .or_insert(s);
        }
    }
    Ok(done)
}

/// The host name, for claims and records.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// How often a running job refreshes its claim, and after how many missed
/// refreshes another host takes the claim to be abandoned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub every_s: u64,
    pub stale_after_beats: u64,
}

impl Default for Heartbeat {
    /// A beat every 30 s; stale after 4 missed beats (2 minutes).
    fn default() -> Self {
        Heartbeat {
            every_s: 30,
            stale_after_beats: 4,
        }
    }
}

impl Heartbeat {
    pub fn stale_after_s(&self) -> u64 {
        self.every_s.max(1) * self.stale_after_beats.max(1)
    }
}

/// Who is training a job, written to its claim file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claim {
    pub host: String,
    pub pid: u32,
    /// The process's start time (Linux clock ticks since boot), so that a
    /// later process that reuses the pid is not taken for the claimant.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// Finished epochs of the job when the claim was last refreshed.
    pub epoch: usize,
    pub updated_unix_s: u64,
    /// The claimant's heartbeat; claims written without one go stale after an hour.
    #[serde(default = "legacy_heartbeat")]
    pub heartbeat: Heartbeat,
}

fn legacy_heartbeat() -> Heartbeat {
    Heartbeat {
        every_s: 3600,
        stale_after_beats: 1,
    }
}

/// What a claim says about its job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimState {
    /// Its process is alive (this host) or beat recently (another host).
    Live,
    /// Its process on this host is gone (or a zombie, or its pid reused).
    Dead,
    /// It missed its heartbeats (another host): abandoned.
    Stale,
}

impl ClaimState {
    pub fn name(self) -> &'static str {
        match self {
            ClaimState::Live => "running",
            ClaimState::Dead => "dead",
            ClaimState::Stale => "stale",
        }
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn claim_path(out: &Path, job: Job) -> PathBuf {
    job.dir(out).join("running.json")
}

/// `(state letter, start time)` of a process from `/proc/<pid>/stat`, or
/// None when there is no such process.
fn process_stat(pid: u32) -> Option<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces;
    // the fields after it start with the state (field 3); the start time is field 22.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// This process's start time, for its claims.
fn own_start() -> Option<u64> {
    process_stat(std::process::id()).map(|(_, start)| start)
}

/// The state of a claim `age_s` seconds after its last refresh: on this
/// host, whether its process still runs (a dead or zombie process, or a
/// pid now held by another process, is dead at once); on another host,
/// whether it missed more beats than its heartbeat allows.
pub fn claim_state(claim: &Claim, age_s: u64) -> ClaimState {
    if claim.host == host_name() && Path::new("/proc/self/stat").exists() {
        return match process_stat(claim.pid) {
            None => ClaimState::Dead,
            Some((state, _)) if state == 'Z' || state == 'X' => ClaimState::Dead,
            Some((_, start)) if claim.pid_start.is_some_and(|s| s != start) => ClaimState::Dead,
            Some(_) => ClaimState::Live,
        };
    }
    if age_s > claim.heartbeat.stale_after_s() {
        ClaimState::Stale
    } else {
        ClaimState::Live
    }
}

fn own_claim(epoch: usize, heartbeat: Heartbeat) -> Claim {
    Claim {
        host: host_name(),
        pid: std::process::id(),
        pid_start: own_start(),
        epoch,
        updated_unix_s: now_unix(),
        heartbeat,
    }
}

/// A job this process holds: a thread refreshes its claim file every
/// `heartbeat.every_s` seconds until `release` (or drop) stops it.
pub struct ClaimGuard {
    path: PathBuf,
    epoch: Arc<AtomicUsize>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    beat: Option<std::thread::JoinHandle<()>>,
}

impl ClaimGuard {
    /// Record `epoch` finished epochs and refresh the claim now.
    pub fn epoch_done(&self, epoch: usize, heartbeat: Heartbeat) -> Result<()> {
        self.epoch.store(epoch, Ordering::SeqCst);
        write_claim(&self.path, &own_claim(epoch, heartbeat))
    }

    /// Stop the heartbeat and remove the claim (the job is finished).
    pub fn release(mut self) {
        self.stop_beating();
        let _ = std::fs::remove_file(&self.path);
    }

    fn stop_beating(&mut self) {
        let (lock, cvar) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cvar.notify_all();
        if let Some(t) = self.beat.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClaimGuard {
    /// A job that ends in an error keeps its claim file (its process is
    /// about to exit, which makes the claim dead) but stops beating.
    fn drop(&mut self) {
        self.stop_beating();
    }
}

fn write_claim(path: &Path, claim: &Claim) -> Result<()> {
    atomic_write(path, serde_json::to_string(claim)?.as_bytes())
}

/// Create the claim file only if there is none, with its content in place
/// from the start: written to a temporary file, then hard-linked to the
/// claim's name (which fails when the name exists).
fn create_exclusively(path: &Path, claim: &Claim) -> Result<bool> {
    let tmp = path.with_file_name(format!(".running.json.{}", std::process::id()));
    std::fs::write(&tmp, serde_json::to_string(claim)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    crate::faults::point("before", path);
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => {
            crate::faults::point("after", path);
            Ok(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(e).with_context(|| format!("creating {}", path.display())),
    }
}

/// Remove an abandoned claim `seen`, unless another process replaced it
/// meanwhile: the file is moved aside atomically (one process wins the
/// move) and deleted only if it still holds `seen`.
fn take_over(path: &Path, seen: &Claim) {
    let aside = path.with_file_name(format!(".running.json.taken.{}", std::process::id()));
    if std::fs::rename(path, &aside).is_err() {
        return;
    }
    let moved = std::fs::read_to_string(&aside)
        .ok()
        .and_then(|t| serde_json::from_str::<Claim>(&t).ok());
    if moved.as_ref().is_some_and(|c| c != seen) {
        // A live claimant replaced it between our read and the move: give it back.
        let _ = std::fs::hard_link(&aside, path);
    }
    let _ = std::fs::remove_file(&aside);
}

/// Claim `job` for this process. Returns the other claim when a live
/// process already holds it (two shards given the same work by mistake), so
/// the caller skips the job instead of training it twice; a dead or stale
/// claim is taken over. Two processes starting together cannot both win:
/// the claim file is created exclusively.
pub fn try_claim(
    out: &Path,
    job: Job,
    heartbeat: Heartbeat,
) -> Result<std::result::Result<ClaimGuard, Claim>> {
    let path = claim_path(out, job);
    std::fs::create_dir_all(job.dir(out))
        .with_context(|| format!("creating {}", job.dir(out).display()))?;
    for _ in 0..3 {
        if create_exclusively(&path, &own_claim(0, heartbeat))? {
            return Ok(Ok(start_heartbeat(path, heartbeat)));
        }
        match read_claim(out, job) {
            Some((other, age)) if claim_state(&other, age) == ClaimState::Live => {
                return Ok(Err(other))
            }
            Some((other, _)) => take_over(&path, &other),
            // Unreadable: a claim file torn by a crash (claims are written whole, so not a live one).
            None => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    bail!(
        "could not claim {} (another process keeps re-creating it)",
        path.display()
    )
}

fn start_heartbeat(path: PathBuf, heartbeat: Heartbeat) -> ClaimGuard {
    let epoch = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new((Mutex::new(false), Condvar::new()));
    let (e, s, p) = (epoch.clone(), stop.clone(), path.clone());
    let beat = std::thread::spawn(move || {
        let (lock, cvar) = &*s;
        let mut stopped = lock.lock().unwrap_or_else(|e| e.into_inner());
        let every = std::time::Duration::from_secs(heartbeat.every_s.max(1));
        loop {
            // The flag is checked under the lock before every wait, so a stop
            // that comes before the thread first waits is not missed.
            let (guard, _) = cvar
                .wait_timeout_while(stopped, every, |stop| !*stop)
                .unwrap_or_else(|e| e.into_inner());
            stopped = guard;
            if *stopped {
                return;
            }
            if let Err(err) = write_claim(&p, &own_claim(e.load(Ordering::SeqCst), heartbeat)) {
                eprintln!("warning: refreshing the claim {}: {err:#}", p.display());
            }
        }
    });
    ClaimGuard {
        path,
        epoch,
        stop,
        beat: Some(beat),
    }
}

/// The claim of `job` if one exists, with its age in seconds.
pub fn read_claim(out: &Path, job: Job) -> Option<(Claim, u64)> {
    let text = std::fs::read_to_string(claim_path(out, job)).ok()?;
    let claim: Claim = serde_json::from_str(&text).ok()?;
    let age = now_unix().saturating_sub(claim.updated_unix_s);
    Some((claim, age))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_jobs() {
        let jobs = all_jobs(&[2, 4, 8, 16, 32], &[0, 1]);
        assert_eq!(jobs.len(), 10);
        let mut union: Vec<Job> = (0..3)
            .flat_map(|i| Shard { index: i, count: 3 }.select(&jobs))
            .collect();
        union.sort();
        assert_eq!(union, jobs);
    }

    #[test]
    fn shard_parsing_and_environment() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
        assert!(Shard::parse("4/4").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string())
        };
        assert_eq!(
            Shard::from_env(env(&[
                ("SLURM_ARRAY_TASK_ID", "2"),
                ("SLURM_ARRAY_TASK_COUNT", "3")
            ]))
            .unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        assert_eq!(
            Shard::from_env(env(&[
                ("SLURM_ARRAY_TASK_ID", "3"),
                ("SLURM_ARRAY_TASK_COUNT", "3"),
                ("SLURM_ARRAY_TASK_MIN", "1")
            ]))
            .unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        assert_eq!(
            Shard::from_env(env(&[
                ("JOB_COMPLETION_INDEX", "0"),
                ("EFFRANK_SHARD_COUNT", "2")
            ]))
            .unwrap(),
            Some(Shard { index: 0, count: 2 })
        );
        assert!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "0")])).is_err());
        assert_eq!(Shard::from_env(env(&[])).unwrap(), None);
    }
}

#[cfg(test)]
mod claim_tests {
    use super::*;

    #[test]
    fn a_live_claim_blocks_a_second_claimant_and_a_dead_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let job = Job {
            rank: 8,
            seed: 0,
            budget: None,
        };
        let hb = Heartbeat::default();
        let guard = try_claim(dir.path(), job, hb)
            .unwrap()
            .expect("the first claim wins");
        // Our own process holds it and is alive: a second claim sees it.
        assert!(try_claim(dir.path(), job, hb).unwrap().is_err());
        guard.epoch_done(2, hb).unwrap();
        assert_eq!(read_claim(dir.path(), job).unwrap().0.epoch, 2);
        guard.release();
        assert!(read_claim(dir.path(), job).is_none());
        // A claim of a dead process on this host is taken over at once.
        let dead = Claim {
            host: host_name(),
            pid: u32::MAX - 1,
            pid_start: None,
            epoch: 3,
            updated_unix_s: now_unix(),
            heartbeat: hb,
        };
        assert_eq!(claim_state(&dead, 0), ClaimState::Dead);
        std::fs::write(
            claim_path(dir.path(), job),
            serde_json::to_string(&dead).unwrap(),
        )
        .unwrap();
        try_claim(dir.path(), job, hb)
            .unwrap()
            .expect("a dead claim is taken over")
            .release();
        // A torn claim file (unreadable) is taken over too.
        std::fs::write(claim_path(dir.path(), job), "{\"host\":").unwrap();
        try_claim(dir.path(), job, hb)
            .unwrap()
            .expect("a torn claim is taken over")
            .release();
    }

    #[test]
    fn this_process_is_live_and_a_reused_pid_or_missed_beats_are_not() {
        let hb = Heartbeat {
            every_s: 2,
            stale_after_beats: 3,
        };
        let me = own_claim(0, hb);
        assert_eq!(
            claim_state(&me, 1000),
            ClaimState::Live,
            "on this host, liveness is the process, not the age"
        );
        let reused = Claim {
            pid_start: me.pid_start.map(|s| s + 1),
            ..me.clone()
        };
        assert_eq!(claim_state(&reused, 0), ClaimState::Dead);
        let elsewhere = Claim {
            host: "another-host".into(),
            ..me
        };
        assert_eq!(claim_state(&elsewhere, 6), ClaimState::Live);
        assert_eq!(claim_state(&elsewhere, 7), ClaimState::Stale);
    }

    #[test]
    fn the_heartbeat_refreshes_the_claim_on_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let job = Job {
            rank: 4,
            seed: 1,
            budget: None,
        };
        let hb = Heartbeat {
            every_s: 1,
            stale_after_beats: 2,
        };
        let guard = try_claim(dir.path(), job, hb).unwrap().unwrap();
        let path = claim_path(dir.path(), job);
        let first = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2300));
        let later = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(later > first, "no beat in 2.3 s with a 1 s heartbeat");
        drop(guard);
        assert!(path.exists(), "an abandoned job keeps its (now dead) claim");
    }

    #[test]
    fn claims_written_before_heartbeats_still_read() {
        let old = r#"{"host":"h","pid":1,"epoch":2,"updated_unix_s":5}"#;
        let c: Claim = serde_json::from_str(old).unwrap();
        assert_eq!(c.heartbeat.stale_after_s(), 3600);
    }
}
