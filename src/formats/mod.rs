//! Readers of serialization formats that other programs write, independent
//! of what the data means to the engine.
//!
//! - `pickle`: Python's pickle, as a virtual machine that executes nothing
//!   and hands globals, calls and persistent ids to the caller's hooks. The
//!   torch layer (`model::pth`) reads `torch.save`'d checkpoints with it.
//!
//! A format here knows no model or data set; the layers that give its values
//! a meaning (tensors, arrays) live with the code that uses them.

pub mod pickle;
