//! Threads left idle by a sweep's finished workers, lent to the students
//! still training.
//!
//! `sweep --parallel` on the CPU trains one student per thread, longest
//! first. Once the queue is empty, a worker that finishes has nothing left
//! to take, and its thread would idle while the last student trains alone
//! (in a small32 sweep of 9 ranks on 2 threads, rank 1, the last, took
//! 17.5-19.2 s of a 125-129 s stage). The finished worker lends its thread
//! here instead, and a
//! `Learner` whose batches are split into halves but who has no second
//! thread of its own borrows it and computes its second half there
//! (`train::step`). Where a half is computed does not change its bits, so
//! neither do the results.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Threads lent and not borrowed.
static SPARE: AtomicUsize = AtomicUsize::new(0);

/// Threads a finished worker lends until this is dropped (the end of the
/// sweep, once every student, and so every `Loan`, is gone).
#[must_use = "the threads are lent until this is dropped"]
pub struct Lent(usize);

/// Lend `threads` idle threads.
pub fn lend(threads: usize) -> Lent {
    SPARE.fetch_add(threads, Ordering::SeqCst);
    Lent(threads)
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Saturating: a loan still out (a test's learner outliving its
        // sweep) must not wrap the count around.
        let _ = SPARE.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
            Some(n.saturating_sub(self.0))
        });
    }
}

/// One borrowed thread, given back when dropped.
#[must_use = "the thread is given back when this is dropped"]
pub struct Loan(());

/// A lent thread, if one is idle.
pub fn borrow() -> Option<Loan> {
    SPARE
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .ok()
        .map(|_| Loan(()))
}

impl Drop for Loan {
    fn drop(&mut self) {
        SPARE.fetch_add(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_is_borrowed_once_and_given_back() {
        // The count is process-wide; no other unit test of the library
        // lends or borrows, so this test's thread is the only one lent.
        let lent = lend(1);
        let loan = borrow().expect("one thread was lent");
        drop(loan);
        let again = borrow().expect("the loan was given back");
        drop(again);
        drop(lent);
    }
}
