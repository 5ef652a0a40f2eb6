//! Release builds only, and only where the link is known to go through
//! rust-lld (x86_64-unknown-linux-gnu with Rust >= 1.90 and rust-lld in the
//! sysroot; no linker of one's own):
//!
//! - the functions in `build/symbols.order` (written by
//!   `scripts/symbol-order.py`) are laid out first, hottest first: what
//!   start-up, idle and the proxy path run sits together, so an idle sidecar
//!   maps ~3 MB of its text instead of ~7.7 MB, and the hot path shares
//!   i-cache lines and iTLB entries. A name the file has and the binary does
//!   not (after a dependency or toolchain upgrade) is skipped by lld;
//! - relative relocations are packed (RELR, `-z pack-relative-relocs`): the
//!   480 KB the loader reads at every start shrink to a few KB. The binary
//!   then needs glibc 2.36 (Debian 12, the Dockerfile's distroless image), so
//!   this is done only when the building machine's glibc is that recent.
//!
//! `DOCKERFLOW_SIDECAR_PLAIN_LINK=1` turns both off.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build/symbols.order");
    println!("cargo::rerun-if-env-changed=DOCKERFLOW_SIDECAR_PLAIN_LINK");
    let env = |name| std::env::var(name).unwrap_or_default();
    if env("PROFILE") != "release"
        || env("TARGET") != "x86_64-unknown-linux-gnu"
        || !env("DOCKERFLOW_SIDECAR_PLAIN_LINK").is_empty()
        // A linker of one's own (RUSTFLAGS -C linker=..., -C link-arg=-fuse-ld=...,
        // target.<triple>.linker) may not be lld.
        || env("CARGO_ENCODED_RUSTFLAGS").contains("link")
        || !env("RUSTC_LINKER").is_empty()
        || !rust_lld_is_the_linker(&env("RUSTC"))
    {
        return;
    }
    if glibc_at_least(2, 36) {
        println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join("build/symbols.order");
    if order.is_file() {
        println!(
            "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}

/// Rust 1.90 made rust-lld the default linker of x86_64-unknown-linux-gnu,
/// where the toolchain ships it (rustup's does; a distribution's may not).
fn rust_lld_is_the_linker(rustc: &str) -> bool {
    let run = |args: &[&str]| {
        Command::new(rustc)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let version = run(&["-vV"]);
    let minor = version
        .lines()
        .find_map(|l| l.strip_prefix("release: 1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    let sysroot = run(&["--print", "sysroot"]);
    let lld =
        Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld");
    minor.is_some_and(|m| m >= 90) && lld.is_file()
}

/// The building machine's glibc (`getconf GNU_LIBC_VERSION`: "glibc 2.36").
fn glibc_at_least(major: u32, minor: u32) -> bool {
    Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            let version = text.trim().strip_prefix("glibc ")?.to_owned();
            let mut parts = version.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next()??))
        })
        .is_some_and(|v| v >= (major, minor))
}
