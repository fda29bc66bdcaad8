//! Teacher logits computed once per (seed, epoch) and reused by every rank.
//!
//! Batch order and augmentation are pure functions of (seed, epoch, index),
//! so every student of a sweep that shares the seed sees exactly the same
//! augmented images in the same order, and the teacher's logits for them are
//! the same. They are computed on first use, kept in memory, and written to
//! `<dir>/teacher-logits-<key>-e<epoch>.f32` (raw little-endian fp32, `n x
//! classes` in batch order) so that other processes (shards) and resumed runs
//! reuse them too. `key` must identify the teacher, data, augmentation and
//! normalization; a file of the wrong length is ignored and recomputed.

use super::step::Frozen;
use crate::data::{for_each_batch, Augment, BatchPass, Dataset};
use crate::durable::atomic_write;
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use anyhow::{Context, Result};
use std::collections::HashMap;
use std::path::PathBuf;

/// Per-epoch teacher logits over a training set.
pub struct TeacherLogits<B: Backend> {
    pub teacher: Frozen<B>,
    pub transform: ImageTransform,
    pub augment: Augment,
    pub seed: u64,
    pub batch: usize,
    /// Folder for the on-disk cache; `None` keeps it in memory only.
    pub dir: Option<PathBuf>,
    pub key: String,
    /// The most recently used epochs' logits (older ones are on disk).
    memory: RecentEpochs,
    /// Epochs whose logits were computed by a teacher forward pass.
    pub epochs_computed: usize,
    /// Epochs whose logits came from memory or disk.
    pub epochs_reused: usize,
    /// Seconds spent in teacher forward passes.
    pub teacher_seconds: f64,
}

/// Epochs of logits kept in memory.
const MEMORY_EPOCHS: usize = 4;

/// At most `capacity` epochs of logits, the least recently used dropped
/// first, never the one just stored. The students of a sweep walk the
/// epochs in order, but students trained at once stand at different
/// epochs, so the oldest epoch number is not the one to drop: it may be
/// the one a student asks for right now. Bounded because a reference-size
/// sweep (200 epochs of 50,000 x 100 logits) would otherwise hold gigabytes.
struct RecentEpochs {
    capacity: usize,
    /// epoch -> (logits, the use count when last used)
    entries: HashMap<u64, (Vec<f32>, u64)>,
    uses: u64,
}

impl RecentEpochs {
    fn new(capacity: usize) -> Self {
        RecentEpochs {
            capacity: capacity.max(1),
            entries: HashMap::new(),
            uses: 0,
        }
    }

    /// The logits of `epoch` if held and of `len` values.
    fn get(&mut self, epoch: u64, len: usize) -> Option<&[f32]> {
        self.uses += 1;
        let uses = self.uses;
        let (logits, last) = self
            .entries
            .get_mut(&epoch)
            .filter(|(v, _)| v.len() == len)?;
        *last = uses;
        Some(logits)
    }

    /// Store `logits` of `epoch` and return them.
    fn insert(&mut self, epoch: u64, logits: Vec<f32>) -> &[f32] {
        self.uses += 1;
        self.entries.insert(epoch, (logits, self.uses));
        while self.entries.len() > self.capacity {
            let (&oldest, _) = self
                .entries
                .iter()
                .filter(|(&e, _)| e != epoch)
                .min_by_key(|(_, (_, last))| *last)
                .expect("more than one entry");
            self.entries.remove(&oldest);
        }
        &self.entries[&epoch].0
    }
}

/// A 64-bit FNV-1a hash, for short cache keys.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl<B: Backend> TeacherLogits<B> {
    pub fn new(
        teacher: Frozen<B>,
        transform: ImageTransform,
        augment: Augment,
        seed: u64,
        batch: usize,
        dir: Option<PathBuf>,
        key: &str,
    ) -> Self {
        TeacherLogits {
            teacher,
            transform,
            augment,
            seed,
            batch,
            dir,
            key: format!("{:016x}-s{seed}", fnv1a(key)),
            memory: RecentEpochs::new(MEMORY_EPOCHS),
            epochs_computed: 0,
            epochs_reused: 0,
            teacher_seconds: 0.0,
        }
    }

    fn file(&self, epoch: u64) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join(format!("teacher-logits-{}-e{epoch}.f32", self.key)))
    }

    /// Logits of every sample of `epoch`, in `order` (the epoch's batch order).
    pub fn epoch(
        &mut self,
        be: &B,
        train: &Dataset,
        order: &[usize],
        epoch: u64,
    ) -> Result<&[f32]> {
        let expected = order.len() * self.teacher.model.cfg.classes;
        if self.memory.get(epoch, expected).is_some() {
            self.epochs_reused += 1;
            return Ok(self.memory.get(epoch, expected).expect("just found"));
        }
        if let Some(path) = self.file(epoch) {
            if let Ok(bytes) = std::fs::read(&path) {
                if bytes.len() == expected * 4 {
                    self.epochs_reused += 1;
                    return Ok(self
                        .memory
                        .insert(epoch, bytemuck::pod_collect_to_vec(&bytes)));
                }
            }
        }
        let started = std::time::Instant::now();
        let mut all = Vec::with_capacity(expected);
        let pass = BatchPass {
            ds: train,
            order,
            batch: self.batch,
            aug: &self.augment,
            seed: self.seed,
            epoch,
        };
        let teacher = &mut self.teacher;
        let transform = &self.transform;
        for_each_batch(pass, |_, bytes, labels| {
            all.extend(teacher.logits(be, bytes, labels.len(), transform)?);
            Ok(())
        })?;
        self.teacher_seconds += started.elapsed().as_secs_f64();
        self.epochs_computed += 1;
        if let Some(path) = self.file(epoch) {
            atomic_write(&path, bytemuck::cast_slice(&all))
                .with_context(|| format!("caching teacher logits in {}", path.display()))?;
        }
        Ok(self.memory.insert(epoch, all))
    }
}

#[cfg(test)]
mod tests {
    use super::RecentEpochs;

    /// Students at different epochs: the epoch just stored is kept even
    /// when it is the oldest, and the least recently used one goes.
    #[test]
    fn recent_epochs_keep_the_one_just_stored_and_drop_the_least_recently_used() {
        let mut m = RecentEpochs::new(3);
        for e in [5, 6, 7] {
            assert_eq!(m.insert(e, vec![e as f32; 2]), &[e as f32; 2]);
        }
        assert!(m.get(5, 2).is_some(), "5 used again");
        assert_eq!(
            m.insert(0, vec![0.0; 2]),
            &[0.0; 2],
            "the oldest epoch number, just stored"
        );
        assert!(m.get(6, 2).is_none(), "6 was the least recently used");
        assert!(m.get(5, 2).is_some() && m.get(7, 2).is_some() && m.get(0, 2).is_some());
        assert!(
            m.get(7, 3).is_none(),
            "a length that does not match is not a hit"
        );
        let mut one = RecentEpochs::new(1);
        one.insert(3, vec![1.0]);
        assert_eq!(one.insert(1, vec![2.0]), &[2.0]);
        assert!(one.get(3, 1).is_none());
    }
}
