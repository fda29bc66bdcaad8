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
use crate::ops::image::ImageTransform;
use crate::ops::Backend;
use crate::data::{augmented_batch, Augment, Dataset};
use crate::io::atomic_write;
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
    /// The last epochs' logits (at most `MEMORY_EPOCHS`; older ones are on disk).
    memory: HashMap<u64, Vec<f32>>,
    /// Epochs whose logits were computed by a teacher forward pass.
    pub epochs_computed: usize,
    /// Epochs whose logits came from memory or disk.
    pub epochs_reused: usize,
    /// Seconds spent in teacher forward passes.
    pub teacher_seconds: f64,
}

/// Epochs of logits kept in memory.
const MEMORY_EPOCHS: usize = 4;

/// A 64-bit FNV-1a hash, for short cache keys.
pub fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl<B: Backend> TeacherLogits<B> {
    pub fn new(teacher: Frozen<B>, transform: ImageTransform, augment: Augment, seed: u64, batch: usize, dir: Option<PathBuf>, key: &str) -> Self {
        TeacherLogits {
            teacher,
            transform,
            augment,
            seed,
            batch,
            dir,
            key: format!("{:016x}-s{seed}", fnv1a(key)),
            memory: HashMap::new(),
            epochs_computed: 0,
            epochs_reused: 0,
            teacher_seconds: 0.0,
        }
    }

    fn file(&self, epoch: u64) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("teacher-logits-{}-e{epoch}.f32", self.key)))
    }

    /// Logits of every sample of `epoch`, in `order` (the epoch's batch order).
    pub fn epoch(&mut self, be: &B, train: &Dataset, order: &[usize], epoch: u64) -> Result<&[f32]> {
        let expected = order.len() * self.teacher.model.cfg.classes;
        if self.memory.get(&epoch).is_some_and(|v| v.len() == expected) {
            self.epochs_reused += 1;
            return Ok(&self.memory[&epoch]);
        }
        if let Some(path) = self.file(epoch) {
            if let Ok(bytes) = std::fs::read(&path) {
                if bytes.len() == expected * 4 {
                    self.epochs_reused += 1;
                    self.remember(epoch, bytemuck::pod_collect_to_vec(&bytes));
                    return Ok(&self.memory[&epoch]);
                }
            }
        }
        let started = std::time::Instant::now();
        let mut all = Vec::with_capacity(expected);
        let (mut bytes, mut labels) = (Vec::new(), Vec::new());
        for chunk in order.chunks(self.batch) {
            augmented_batch(train, chunk, &self.augment, self.seed, epoch, &mut bytes, &mut labels)?;
            all.extend(self.teacher.logits(be, &bytes, chunk.len(), &self.transform)?);
        }
        self.teacher_seconds += started.elapsed().as_secs_f64();
        self.epochs_computed += 1;
        if let Some(path) = self.file(epoch) {
            atomic_write(&path, bytemuck::cast_slice(&all)).with_context(|| format!("caching teacher logits in {}", path.display()))?;
        }
        self.remember(epoch, all);
        Ok(&self.memory[&epoch])
    }

    /// Keep `logits` of `epoch` in memory, dropping the oldest epoch beyond
    /// `MEMORY_EPOCHS`: the students of a sweep walk the epochs in order,
    /// and a reference-size sweep (200 epochs of 50,000 x 100 logits) would
    /// otherwise hold gigabytes.
    fn remember(&mut self, epoch: u64, logits: Vec<f32>) {
        self.memory.insert(epoch, logits);
        while self.memory.len() > MEMORY_EPOCHS {
            let oldest = *self.memory.keys().min().expect("not empty");
            self.memory.remove(&oldest);
        }
    }
}
