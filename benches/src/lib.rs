//! `airlock-benches`: criterion micro-benchmarks and load benchmarks of the gateway
//! (see BENCHMARKS.md once they land). Empty until the benchmark work starts.
