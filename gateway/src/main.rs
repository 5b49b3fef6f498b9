//! The `airlock` binary: everything lives in the library; see [`airlock::cli`].
//!
//! The global allocator is jemalloc: the gateway allocates and frees many small,
//! short-lived buffers per request on its worker threads, where glibc's malloc spent
//! about a fifth of the gateway's CPU (BENCHMARKS.md, "Where the time goes").

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    airlock::cli::main()
}
