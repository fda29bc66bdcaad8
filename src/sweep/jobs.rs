//! The work of a sweep as a list of independent jobs (rank, seed), how a
//! shard picks its share, which jobs are finished (their records in the
//! results folder, `crate::results`) and which are claimed.
//!
//! A job being trained has a claim file `runs/r<rank>-s<seed>/running.json`
//! naming its host and process, created exclusively and refreshed every
//! epoch; `sweep --status` reads both.

use crate::io::atomic_write;
use crate::results::{read_records, Record, StudentRecord};
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One student to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Job {
    pub rank: usize,
    pub seed: u64,
}

impl Job {
    /// The job's own folder (checkpoints, metrics, claim).
    pub fn dir(&self, out: &Path) -> PathBuf {
        out.join("runs").join(format!("r{}-s{}", self.rank, self.seed))
    }
}

/// Every (rank, seed) pair, ranks ascending, then seeds.
pub fn all_jobs(ranks: &[usize], seeds: &[u64]) -> Vec<Job> {
    let mut jobs: Vec<Job> = ranks.iter().flat_map(|&rank| seeds.iter().map(move |&seed| Job { rank, seed })).collect();
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
        let (i, n) = text.split_once('/').ok_or_else(|| anyhow!("--shard '{text}': expected I/N, e.g. 0/4"))?;
        let index: usize = i.trim().parse().with_context(|| format!("--shard '{text}': '{i}' is not a number"))?;
        let count: usize = n.trim().parse().with_context(|| format!("--shard '{text}': '{n}' is not a number"))?;
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
        let num = |key: &str| -> Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.trim().parse().map(Some).with_context(|| format!("environment variable {key}='{v}' is not a number")),
            }
        };
        if let Some(id) = num("SLURM_ARRAY_TASK_ID")? {
            let count = num("SLURM_ARRAY_TASK_COUNT")?.ok_or_else(|| anyhow!("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not"))?;
            let min = num("SLURM_ARRAY_TASK_MIN")?.unwrap_or(0);
            let index = id.checked_sub(min).ok_or_else(|| anyhow!("SLURM_ARRAY_TASK_ID {id} < SLURM_ARRAY_TASK_MIN {min}"))?;
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
        jobs.iter().enumerate().filter(|(j, _)| j % self.count == self.index).map(|(_, job)| *job).collect()
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
            done.entry(Job { rank: s.rank, seed: s.seed }).or_insert(s);
        }
    }
    Ok(done)
}

/// The host name, for claims and records.
pub fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()))
        .unwrap_or_else(|| "unknown".into())
}

/// Who is training a job, written to its claim file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claim {
    pub host: String,
    pub pid: u32,
    pub epoch: usize,
    pub updated_unix_s: u64,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// A claim older than this without a refresh is taken to be dead (its
/// process was killed); claims are refreshed after every epoch.
pub const CLAIM_STALE_AFTER_S: u64 = 3600;

fn claim_path(out: &Path, job: Job) -> PathBuf {
    job.dir(out).join("running.json")
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// True when the claim's process may still be working: on this host, its
/// process exists; on another host, it refreshed the claim recently.
pub fn claim_is_live(claim: &Claim, age_s: u64) -> bool {
    if claim.host == host_name() {
        claim.pid == std::process::id() || process_alive(claim.pid)
    } else {
        age_s < CLAIM_STALE_AFTER_S
    }
}

/// Claim `job` for this process. Returns the other claim when a live
/// process already holds it (two shards given the same work by mistake), so
/// the caller skips the job instead of training it twice. The claim file is
/// created exclusively, so two processes starting together cannot both win.
pub fn try_claim(out: &Path, job: Job) -> Result<Option<Claim>> {
    let path = claim_path(out, job);
    std::fs::create_dir_all(job.dir(out)).with_context(|| format!("creating {}", job.dir(out).display()))?;
    for _ in 0..2 {
        let claim = Claim { host: host_name(), pid: std::process::id(), epoch: 0, updated_unix_s: now_unix() };
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(mut f) => {
                use std::io::Write;
                f.write_all(serde_json::to_string(&claim)?.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
                return Ok(None);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => match read_claim(out, job) {
                Some((other, age)) if claim_is_live(&other, age) => return Ok(Some(other)),
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            },
            Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
        }
    }
    bail!("could not claim {} (another process keeps re-creating it)", path.display())
}

/// Refresh this process's claim of `job` after `epoch` finished epochs.
pub fn refresh_claim(out: &Path, job: Job, epoch: usize) -> Result<()> {
    let claim = Claim { host: host_name(), pid: std::process::id(), epoch, updated_unix_s: now_unix() };
    atomic_write(&claim_path(out, job), serde_json::to_string(&claim)?.as_bytes())
}

/// Remove the claim of a finished job.
pub fn clear_claim(out: &Path, job: Job) {
    let _ = std::fs::remove_file(claim_path(out, job));
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
        let mut union: Vec<Job> = (0..3).flat_map(|i| Shard { index: i, count: 3 }.select(&jobs)).collect();
        union.sort();
        assert_eq!(union, jobs);
    }

    #[test]
    fn shard_parsing_and_environment() {
        assert_eq!(Shard::parse("1/4").unwrap(), Shard { index: 1, count: 4 });
        assert!(Shard::parse("4/4").is_err());
        assert!(Shard::parse("x").is_err());
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string());
        assert_eq!(Shard::from_env(env(&[("SLURM_ARRAY_TASK_ID", "2"), ("SLURM_ARRAY_TASK_COUNT", "3")])).unwrap(), Some(Shard { index: 2, count: 3 }));
        assert_eq!(
            Shard::from_env(env(&[("SLURM_ARRAY_TASK_ID", "3"), ("SLURM_ARRAY_TASK_COUNT", "3"), ("SLURM_ARRAY_TASK_MIN", "1")])).unwrap(),
            Some(Shard { index: 2, count: 3 })
        );
        assert_eq!(Shard::from_env(env(&[("JOB_COMPLETION_INDEX", "0"), ("EFFRANK_SHARD_COUNT", "2")])).unwrap(), Some(Shard { index: 0, count: 2 }));
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
        let job = Job { rank: 8, seed: 0 };
        assert!(try_claim(dir.path(), job).unwrap().is_none());
        // Our own process holds it and is alive: a second claim sees it.
        assert!(try_claim(dir.path(), job).unwrap().is_some());
        // A claim of a dead process on this host is taken over.
        let dead = Claim { host: host_name(), pid: u32::MAX - 1, epoch: 3, updated_unix_s: now_unix() };
        std::fs::write(claim_path(dir.path(), job), serde_json::to_string(&dead).unwrap()).unwrap();
        assert!(try_claim(dir.path(), job).unwrap().is_none());
        clear_claim(dir.path(), job);
        assert!(read_claim(dir.path(), job).is_none());
    }
}
