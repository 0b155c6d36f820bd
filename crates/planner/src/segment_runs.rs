//! Runs of equal-length segments, for kernels that take dense `[batch, heads, len, dim]` inputs.
//!
//! Consecutive segments with the same (query, key) lengths are contiguous in the packed layout, so a run of them
//! is a plain view `[count, len, heads, dim]` of the packed tensor: no gather, no padding, exact.

/// `count` consecutive segments, each `q_len` query rows starting at `q_start + i * q_len` and `k_len` key rows
/// starting at `k_start + i * k_len` (offsets within the region the segment tables describe).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub q_start: usize,
    pub k_start: usize,
    pub count: usize,
    pub q_len: usize,
    pub k_len: usize,
}

/// Group segments described by cumulative tables `cu_q`, `cu_k` (same number of segments) into runs.
/// Segments with no query rows produce no output and are skipped.
pub fn runs_from_lengths(cu_q: &[i32], cu_k: &[i32]) -> Vec<Run> {
    assert_eq!(cu_q.len(), cu_k.len(), "segment tables differ in length");
    let mut runs: Vec<Run> = Vec::new();
    for i in 0..cu_q.len().saturating_sub(1) {
        let (q_start, q_len) = (cu_q[i] as usize, (cu_q[i + 1] - cu_q[i]) as usize);
        let (k_start, k_len) = (cu_k[i] as usize, (cu_k[i + 1] - cu_k[i]) as usize);
        if q_len == 0 {
            continue;
        }
        if let Some(last) = runs.last_mut() {
            let contiguous = last.q_start + last.count * last.q_len == q_start
                && last.k_start + last.count * last.k_len == k_start;
            if contiguous && last.q_len == q_len && last.k_len == k_len {
                last.count += 1;
                continue;
            }
        }
        runs.push(Run { q_start, k_start, count: 1, q_len, k_len });
    }
    runs
}
