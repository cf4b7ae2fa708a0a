//! The whole bench in `--quick` mode against the release agent. Too slow (about two minutes) and
//! too machine-dependent for `cargo test`: run it with
//! `cargo test --release -p lockstep-bench -- --ignored` after `cargo build --release -p lockstep-agent`.

use std::path::Path;
use std::process::Command;

#[test]
#[ignore = "runs the full quick bench (~3 min, needs /dev/kvm, root, redis-tools, redis-server, prometheus and a release agent)"]
fn quick_bench_writes_a_complete_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let status = Command::new(env!("CARGO_BIN_EXE_lockstep-bench"))
        .current_dir(&root)
        .args(["--quick", "--out"])
        .arg(out.path())
        .status()
        .expect("run lockstep-bench");
    assert!(status.success(), "lockstep-bench --quick failed: {status}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("benchmarks.json")).unwrap()).unwrap();
    assert!(json["ft_throughput_ratio"].as_f64().unwrap() > 0.0);
    assert!(json["record_throughput_ratio"].as_f64().unwrap() > 0.0);
    for k in ["idle", "kvstore", "compute"] {
        assert!(json["log_bits_per_second"][k].as_f64().unwrap() > 0.0, "log_bits_per_second.{k}");
    }
    for k in ["min", "median", "max"] {
        assert!(json["failover_seconds"][k].as_f64().unwrap() > 0.0, "failover_seconds.{k}");
    }
    for k in ["16MiB", "64MiB", "256MiB"] {
        assert!(json["clone_pause_seconds"][k].as_f64().unwrap() > 0.0, "clone_pause_seconds.{k}");
    }
    assert!(json["prometheus"]["within_5_percent"].as_bool().unwrap());
    assert!(json["ft_added_cpu_us_per_exit"].is_number(), "ft_added_cpu_us_per_exit");
    for k in ["plain", "ft"] {
        // At least KVM_RUN per exit.
        assert!(json["syscalls_per_exit"][k].as_f64().unwrap() >= 1.0, "syscalls_per_exit.{k}");
    }
    assert!(json["machine"]["mmio_exit_us"].as_f64().unwrap() > 0.0);
    assert!(json["throughput"].as_array().unwrap().iter().any(|c| c["mode"] == "native"));
    let md = std::fs::read_to_string(out.path().join("benchmarks.md")).unwrap();
    assert!(md.contains("## Against the targets"));
    for png in ["latency-cdf.png", "failover-log-bandwidth.png"] {
        assert!(out.path().join("img").join(png).exists(), "{png}");
    }
}
