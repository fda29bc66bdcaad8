//! Training: the objective, AdamW, the learning-rate schedule and the step
//! that ties them to the model.

pub mod loss;
pub mod optimizer;
pub mod schedule;
pub mod step;

pub use loss::LossSpec;
pub use optimizer::{AdamW, AdamWConfig};
pub use schedule::CosineSchedule;
pub use step::{Frozen, Learner, StepStats, TeacherSignal};
