//! Benchmark (not a test): etcd-inspect against etcdctl on kube-shaped data
//! in etcd 3.4. `scripts/bench-inspect.sh` starts a throwaway etcd and runs
//! this in release mode; see [`atrest_bench::inspect`].
//!
//! ```text
//! etcd-inspect-bench --endpoints http://127.0.0.1:2379 --keys 100000,200000,1000000
//! ```

use std::process::ExitCode;

use atrest_bench::inspect;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = if args.first().map(String::as_str) == Some("measure") {
        inspect::measure(&args[1..])
    } else {
        inspect::Flags::parse(&args).and_then(|f| inspect::run(&f))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("etcd-inspect-bench: {e:#}");
            ExitCode::from(2)
        }
    }
}
