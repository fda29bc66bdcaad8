//! Training: the objective, AdamW, the learning-rate schedule, the step that
//! ties them to the model, the epoch loop with checkpoints and resume, one
//! student's whole path (shared by `distill` and `sweep`), and the
//! teacher-logit cache of the sweep.

pub mod fit;
pub mod loss;
pub mod optimizer;
pub mod schedule;
pub mod spare_threads;
pub mod state;
pub mod step;
pub mod student;
pub mod teacher_cache;

pub use fit::{fit, EpochMetrics, FitOptions, FitRun, FitSummary, RunFiles, Teacher};
pub use loss::LossSpec;
pub use optimizer::{AdamW, AdamWConfig};
pub use schedule::CosineSchedule;
pub use step::{Batch, Frozen, StepStats, TeacherSignal, Trainer};
pub use student::{train_student, StudentRun, StudentStart};
pub use teacher_cache::TeacherLogits;
