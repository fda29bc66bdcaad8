//! The shape of a row-wise op (LayerNorm, the fused add + LayerNorm, the
//! losses): `rows` independent rows of `cols` values, stored row after row.

use super::product;
use anyhow::Result;

/// `[rows, cols]`, row-major: each row is normalized (or scored) on its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rows {
    pub rows: usize,
    pub cols: usize,
}

impl Rows {
    pub fn new(rows: usize, cols: usize) -> Self {
        Rows { rows, cols }
    }

    /// `rows · cols`, an error naming `what` instead of an overflow.
    pub(in crate::ops) fn elements(self, what: &str) -> Result<usize> {
        product(what, &[self.rows, self.cols])
    }
}
