//! Criterion benchmarks of the copy loop (filled in by the hot-path work).
fn main() {}
