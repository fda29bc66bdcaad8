//! Dense decompositions and products on the CPU (faer), always on the
//! calling thread, so that their bits never depend on the thread count.
//!
//! faer's convenience methods (`Mat::thin_svd`, `singular_values`,
//! `self_adjoint_eigen`, `&a * &b`) run on faer's global parallelism, by
//! default every thread of the current rayon pool, and their blocked
//! reductions are cut by that count. A sweep factorizes each student on
//! its worker's pool (two threads with `--parallel 1`, one with two
//! workers), so through those methods a 128-wide student started from
//! other factors at `--parallel 1` than at `--parallel 2`. These wrappers
//! pass `Par::Seq` instead; the engine's own products do the same
//! (`ops::matmul::cpu`). Every faer decomposition or dense product of the
//! engine goes through here. The matrices are a layer's weight at most,
//! decomposed once per student: one thread is fast enough.

use faer::diag::Diag;
use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::evd::{self, EvdError};
use faer::linalg::svd::{self, ComputeSvdVectors, SvdError};
use faer::traits::RealField;
use faer::{Accum, Mat, MatRef, Par};

/// A thin SVD `A = U diag(s) Vᵀ`: `u` is `m x k`, `v` is `n x k`, `s` is
/// nonnegative and nonincreasing, `k = min(m, n)`.
pub struct ThinSvd<T> {
    pub u: Mat<T>,
    pub s: Vec<T>,
    pub v: Mat<T>,
}

/// The thin SVD of `a`.
pub fn thin_svd<T: RealField>(a: MatRef<'_, T>) -> Result<ThinSvd<T>, SvdError> {
    let (m, n) = a.shape();
    let k = m.min(n);
    let (mut u, mut v, mut s) = (Mat::zeros(m, k), Mat::zeros(n, k), Diag::zeros(k));
    let thin = ComputeSvdVectors::Thin;
    let scratch = svd::svd_scratch::<T>(m, n, thin, thin, Par::Seq, Default::default());
    svd::svd(
        a,
        s.as_mut(),
        Some(u.as_mut()),
        Some(v.as_mut()),
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    )?;
    let s = s.column_vector().iter().cloned().collect();
    Ok(ThinSvd { u, s, v })
}

/// The singular values of `a`, nonincreasing.
pub fn singular_values<T: RealField>(a: MatRef<'_, T>) -> Result<Vec<T>, SvdError> {
    let (m, n) = a.shape();
    let mut s = Diag::zeros(m.min(n));
    let none = ComputeSvdVectors::No;
    let scratch = svd::svd_scratch::<T>(m, n, none, none, Par::Seq, Default::default());
    svd::svd(
        a,
        s.as_mut(),
        None,
        None,
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    )?;
    Ok(s.column_vector().iter().cloned().collect())
}

/// The eigendecomposition `A = Q diag(μ) Qᵀ` of a symmetric `a` (read from
/// its lower triangle): `(Q, μ)`, `μ` nondecreasing.
pub fn symmetric_eigen<T: RealField>(a: MatRef<'_, T>) -> Result<(Mat<T>, Vec<T>), EvdError> {
    let n = a.nrows();
    assert_eq!(a.ncols(), n, "symmetric_eigen of a non-square matrix");
    let (mut q, mut mu) = (Mat::zeros(n, n), Diag::zeros(n));
    let scratch = evd::self_adjoint_evd_scratch::<T>(
        n,
        evd::ComputeEigenvectors::Yes,
        Par::Seq,
        Default::default(),
    );
    evd::self_adjoint_evd(
        a,
        mu.as_mut(),
        Some(q.as_mut()),
        Par::Seq,
        MemStack::new(&mut MemBuffer::new(scratch)),
        Default::default(),
    )?;
    Ok((q, mu.column_vector().iter().cloned().collect()))
}

/// The product `a · b`.
pub fn product<T: RealField>(a: MatRef<'_, T>, b: MatRef<'_, T>) -> Mat<T> {
    assert_eq!(a.ncols(), b.nrows(), "product of mismatched shapes");
    let mut c = Mat::zeros(a.nrows(), b.ncols());
    faer::linalg::matmul::matmul(c.as_mut(), Accum::Replace, a, b, T::one_impl(), Par::Seq);
    c
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::same_on_any_thread_count;

    fn random(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
        let v = crate::rng::Rng::new(seed).normal_vec(rows * cols, 1.0);
        Mat::from_fn(rows, cols, |i, j| v[i * cols + j] as f64)
    }

    fn bits(m: MatRef<'_, f64>) -> Vec<u64> {
        (0..m.nrows())
            .flat_map(|i| (0..m.ncols()).map(move |j| m[(i, j)].to_bits()))
            .collect()
    }

    /// Each wrapper gives the same bits on any thread count, and the
    /// decompositions reproduce their matrix.
    #[test]
    fn decompositions_and_products_are_the_same_bits_on_any_thread_count() {
        let (a, b) = (random(300, 160, 1), random(160, 200, 2));
        let svd = same_on_any_thread_count("thin_svd", || {
            let d = thin_svd(a.as_ref()).unwrap();
            let s: Vec<u64> = d.s.iter().map(|x| x.to_bits()).collect();
            (bits(d.u.as_ref()), s, bits(d.v.as_ref()))
        });
        let d = thin_svd(a.as_ref()).unwrap();
        let us = Mat::from_fn(300, 160, |i, k| d.u[(i, k)] * d.s[k]);
        let back = product(us.as_ref(), d.v.as_ref().transpose());
        assert!((&back - &a).norm_max() < 1e-10, "U diag(s) Vᵀ = A");
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]));
        let sv = same_on_any_thread_count("singular_values", || {
            let s = singular_values(a.as_ref()).unwrap();
            s.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        });
        assert_eq!(sv.len(), svd.1.len());
        let sym = product(a.as_ref().transpose(), a.as_ref());
        same_on_any_thread_count("symmetric_eigen", || {
            let (q, mu) = symmetric_eigen(sym.as_ref()).unwrap();
            (
                bits(q.as_ref()),
                mu.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        });
        let (q, mu) = symmetric_eigen(sym.as_ref()).unwrap();
        let qm = Mat::from_fn(160, 160, |i, k| q[(i, k)] * mu[k]);
        let back = product(qm.as_ref(), q.as_ref().transpose());
        assert!(
            (&back - &sym).norm_max() < 1e-8 * sym.norm_max(),
            "Q diag(μ) Qᵀ = A"
        );
        assert!(mu.windows(2).all(|w| w[0] <= w[1]));
        let ab =
            same_on_any_thread_count("product", || bits(product(a.as_ref(), b.as_ref()).as_ref()));
        let direct = Mat::from_fn(300, 200, |i, j| {
            (0..160).map(|k| a[(i, k)] * b[(k, j)]).sum::<f64>()
        });
        let ab = Mat::from_fn(300, 200, |i, j| f64::from_bits(ab[i * 200 + j]));
        assert!((&ab - &direct).norm_max() < 1e-10);
    }
}
