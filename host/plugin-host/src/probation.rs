//! A swapped-in version's probation: its first requests are counted, and a version
//! that fails (traps, deadlines, broken results) on more than the allowed share of
//! them is judged bad as soon as the count proves it, so the registry can return to
//! the last good version on its own (as Envoy's and Istio's outlier ejection do for
//! upstream hosts).

use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use serde::Serialize;

const PENDING: u8 = 0;
const PASSED: u8 = 1;
const FAILED: u8 = 2;

/// How a version came out of its probation; reported once, when it is decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Passed,
    Failed { failed: u32, seen: u32 },
}

#[derive(Debug)]
pub struct Probation {
    window: u32,
    /// More failures than this within the window fail the version.
    allowed: u32,
    seen: AtomicU32,
    failed: AtomicU32,
    state: AtomicU8,
}

/// The admin view of a probation.
#[derive(Debug, Clone, Serialize)]
pub struct ProbationStatus {
    pub state: &'static str,
    pub window: u32,
    pub seen: u32,
    pub failed: u32,
}

impl Probation {
    /// A version with nothing to go back to (the first one): never judged.
    pub fn exempt() -> Self {
        Self {
            window: 0,
            allowed: 0,
            seen: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            state: AtomicU8::new(PASSED),
        }
    }

    /// Judged on its first `window` requests: more than `share` of them failing fails
    /// it. A window of 0 means no probation.
    pub fn new(window: u32, share: f64) -> Self {
        if window == 0 {
            return Self::exempt();
        }
        let allowed = (share.clamp(0.0, 1.0) * f64::from(window)).floor() as u32;
        Self {
            window,
            allowed,
            seen: AtomicU32::new(0),
            failed: AtomicU32::new(0),
            state: AtomicU8::new(PENDING),
        }
    }

    /// Counts one request; the verdict, the one time it is reached.
    pub fn record(&self, failed: bool) -> Option<Verdict> {
        if self.state.load(Ordering::Acquire) != PENDING {
            return None;
        }
        let seen = self.seen.fetch_add(1, Ordering::AcqRel) + 1;
        let failures = if failed {
            self.failed.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.failed.load(Ordering::Acquire)
        };
        let (state, verdict) = if failures > self.allowed {
            (
                FAILED,
                Verdict::Failed {
                    failed: failures,
                    seen,
                },
            )
        } else if seen >= self.window {
            (PASSED, Verdict::Passed)
        } else {
            return None;
        };
        self.state
            .compare_exchange(PENDING, state, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| verdict)
    }

    pub fn passed(&self) -> bool {
        self.state.load(Ordering::Acquire) == PASSED
    }

    pub fn status(&self) -> ProbationStatus {
        ProbationStatus {
            state: match self.state.load(Ordering::Acquire) {
                PENDING => "pending",
                PASSED => "passed",
                _ => "failed",
            },
            window: self.window,
            seen: self.seen.load(Ordering::Acquire),
            failed: self.failed.load(Ordering::Acquire),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_as_soon_as_the_share_is_certain_and_passes_at_the_window() {
        let p = Probation::new(20, 0.2);
        // 4 failures of 20 are allowed; the 5th decides, whenever it comes.
        for i in 0..4 {
            assert_eq!(p.record(true), None, "{i}");
        }
        assert_eq!(p.record(true), Some(Verdict::Failed { failed: 5, seen: 5 }));
        assert_eq!(p.record(true), None, "decided once");

        let q = Probation::new(10, 0.2);
        for _ in 0..2 {
            assert_eq!(q.record(true), None);
        }
        for _ in 0..7 {
            assert_eq!(q.record(false), None);
        }
        assert_eq!(q.record(false), Some(Verdict::Passed));
        assert!(q.passed());
        assert_eq!(q.record(true), None);
        assert!(Probation::exempt().passed());
        assert!(Probation::new(0, 0.5).passed());
    }
}
