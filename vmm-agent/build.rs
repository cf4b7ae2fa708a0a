//! Builds the guest programs (../guest, a no_std project outside the workspace) and puts their
//! ELF images in OUT_DIR for `include_bytes!`.
//!
//! The guest needs flags no host crate may see: no start files, static, our linker script,
//! static relocation model. So: clear inherited RUSTFLAGS, pass the flags through
//! CARGO_ENCODED_RUSTFLAGS, and give an explicit `--target` so cargo applies them to the guest
//! only and never to build scripts or proc-macros.

use std::path::{Path, PathBuf};
use std::process::Command;

const GUESTS: [&str; 5] = ["kvstore", "compute", "idle", "fault", "wasi"];
const TARGET: &str = "x86_64-unknown-linux-gnu";

fn rerun_if_changed(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                rerun_if_changed(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../guest").canonicalize().expect("the guest sources are at ../guest");
    let abi = manifest.join("../guest-abi").canonicalize().expect("the guest ABI crate is at ../guest-abi");
    let kv = manifest.join("../guest-kv").canonicalize().expect("the kvstore logic crate is at ../guest-kv");
    let wasi = manifest.join("../guest-wasi").canonicalize().expect("the WASI crate is at ../guest-wasi");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for p in [
        guest.join("src"),
        abi.join("src"),
        kv.join("src"),
        kv.join("Cargo.toml"),
        wasi.join("src"),
        wasi.join("Cargo.toml"),
    ] {
        rerun_if_changed(&p);
    }
    for f in ["Cargo.toml", "Cargo.lock", "link.ld"] {
        println!("cargo:rerun-if-changed={}", guest.join(f).display());
    }

    let linker_script = guest.join("link.ld");
    let flags = [
        "-Clink-arg=-nostartfiles".to_string(),
        "-Clink-arg=-static".to_string(),
        format!("-Clink-arg=-Wl,-T,{}", linker_script.display()),
        "-Clink-arg=-Wl,--build-id=none".to_string(),
        "-Crelocation-model=static".to_string(),
        "-Ctarget-cpu=x86-64".to_string(),
    ]
    .join("\x1f");
    let target_dir = out.join("guest-target");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--target", TARGET, "--manifest-path"])
        .arg(guest.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .status()
        .expect("could not run cargo to build the guest programs");
    assert!(status.success(), "building the guest programs in {} failed (see the errors above)", guest.display());

    let images = out.join("guests");
    std::fs::create_dir_all(&images).expect("create OUT_DIR/guests");
    for g in GUESTS {
        let built = target_dir.join(TARGET).join("release").join(g);
        std::fs::copy(&built, images.join(g))
            .unwrap_or_else(|e| panic!("guest image {} missing: {e}", built.display()));
    }
}
