//! Threads left idle by a sweep's finished workers, lent to the students
//! still training.
//!
//! `sweep --parallel` on the CPU trains one student per thread, longest
//! first. Once the queue is empty, a worker that finishes has nothing left
//! to take, and its thread would idle while the last student trains alone
//! (in a small32 sweep of 9 ranks on 2 threads, rank 1, the last, took
//! 17.5-19.2 s of a 125-129 s stage). The finished worker lends its thread
//! here instead, and a
//! `Trainer` whose batches are split into halves but who has no second
//! thread of its own borrows it and computes its second half there
//! (`train::step`). Where a half is computed does not change its bits, so
//! neither do the results.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Threads lent and not borrowed, shared by one sweep's workers and the
/// trainers of its students (cloning shares the count).
#[derive(Clone, Debug, Default)]
pub struct SpareThreads(Arc<AtomicUsize>);

/// Threads a finished worker lends until this is dropped (the end of the
/// sweep, once every student, and so every `Loan`, is gone).
#[must_use = "the threads are lent until this is dropped"]
pub struct Lent {
    spare: SpareThreads,
    threads: usize,
}

/// One borrowed thread, given back when dropped.
#[must_use = "the thread is given back when this is dropped"]
pub struct Loan(SpareThreads);

impl SpareThreads {
    /// No threads lent yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lend `threads` idle threads.
    pub fn lend(&self, threads: usize) -> Lent {
        self.0.fetch_add(threads, Ordering::SeqCst);
        Lent {
            spare: self.clone(),
            threads,
        }
    }

    /// A lent thread, if one is idle.
    pub fn borrow(&self) -> Option<Loan> {
        self.0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .ok()
            .map(|_| Loan(self.clone()))
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Saturating: a loan still out (a trainer outliving its sweep) must
        // not wrap the count around.
        let n = self.threads;
        let _ = self
            .spare
            .0
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| {
                Some(c.saturating_sub(n))
            });
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        (self.0).0.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_borrowed_once_and_given_back() {
        let spare = SpareThreads::new();
        assert!(spare.borrow().is_none(), "nothing lent yet");
        let lent = spare.lend(1);
        let loan = spare.borrow().expect("one thread was lent");
        assert!(spare.borrow().is_none(), "the only thread is out");
        drop(loan);
        let again = spare.borrow().expect("the loan was given back");
        drop(again);
        drop(lent);
        assert!(spare.borrow().is_none(), "the lender took its thread back");
        // Another sweep's count is its own.
        let _other = SpareThreads::new().lend(3);
        assert!(spare.borrow().is_none());
    }
}
