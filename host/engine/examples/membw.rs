//! The machine's memory bandwidth, by a simple copy loop: the yardstick the issue-16
//! single-stream figure is read against (a decode step of one sequence reads every
//! weight once, so weight bytes / bandwidth is its floor).
//!
//! ```text
//! cargo run --release -p lynx-engine --example membw
//! ```
//!
//! Copies a 256 MiB buffer into another (well past every cache), 10 times, on one
//! thread and then split over every core rayon has, and prints the best rate as read +
//! written bytes per second; then sums the buffer (a read-only stream, what a matmul's
//! weights need) the same way.

use std::time::Instant;

use rayon::prelude::*;

const BYTES: usize = 256 << 20;

fn main() {
    let src: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let mut dst = vec![0u64; BYTES / 8];
    for threads in [1, rayon::current_num_threads()] {
        let mut best = f64::MAX;
        for _ in 0..10 {
            let t0 = Instant::now();
            let chunk = src.len().div_ceil(threads);
            dst.par_chunks_mut(chunk)
                .zip(src.par_chunks(chunk))
                .for_each(|(d, s)| d.copy_from_slice(s));
            best = best.min(t0.elapsed().as_secs_f64());
            std::hint::black_box(&dst);
        }
        let gb = BYTES as f64 / 1e9;
        let mut best_read = f64::MAX;
        for _ in 0..10 {
            let t0 = Instant::now();
            let chunk = src.len().div_ceil(threads);
            let sum = src
                .par_chunks(chunk)
                .map(|s| s.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
                .reduce(|| 0, u64::wrapping_add);
            best_read = best_read.min(t0.elapsed().as_secs_f64());
            std::hint::black_box(sum);
        }
        println!(
            "{threads} thread(s): copy {:.1} GB/s (read + write), read-only sum {:.1} GB/s",
            2.0 * gb / best,
            gb / best_read
        );
    }
}
