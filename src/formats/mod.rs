//! Readers of serialization formats that other programs write, independent
//! of what the data means to the engine.
//!
//! - `pickle`: Python's pickle, as a virtual machine that executes nothing
//!   and hands globals, calls and persistent ids to the caller's hooks. The
//!   torch layer (`model::pth`) reads `torch.save`'d checkpoints with it;
//! - `numpy_pickle`: the numpy layer on it (arrays as `pickle.dump` writes
//!   them), which the CIFAR python folders (`data::cifar_pickle`) use.
//!
//! A format here knows no model or data set; what its values mean to the
//! engine (a state_dict's tensors, a CIFAR batch's images) lives with the
//! code that uses them.

pub mod numpy_pickle;
pub mod pickle;
