//! Lays the binary's functions out in the order of `build/symbols.order`
//! (written by `scripts/symbol-order.py`): what start-up, idle and the proxy
//! path run sits together at the start of .text, so an idle sidecar maps a
//! few MB of its text instead of most of it, and the hot path shares i-cache
//! lines and iTLB entries. Release builds only, and only where the linker is
//! rust-lld (the default for x86_64-unknown-linux-gnu since Rust 1.90): GNU
//! ld does not take the flag. A stale name in the file is skipped by lld.
//!
//! Same conditions, `-z pack-relative-relocs` (RELR): the 480 KB of
//! relative relocations the loader reads at every start shrink to a few KB.
//! It needs glibc 2.36 (Debian 12, the Dockerfile's distroless image); an
//! older glibc refuses the binary at start with a clear message.

use std::path::Path;

fn main() {
    println!("cargo::rerun-if-changed=build/symbols.order");
    println!("cargo::rerun-if-env-changed=DOCKERFLOW_SIDECAR_NO_SYMBOL_ORDER");
    let env = |name| std::env::var(name).unwrap_or_default();
    let order = Path::new(&env("CARGO_MANIFEST_DIR")).join("build/symbols.order");
    let lld = env("TARGET") == "x86_64-unknown-linux-gnu"
        // A linker of one's own (RUSTFLAGS -C linker=..., -C link-arg=-fuse-ld=...)
        // may not be lld.
        && !env("CARGO_ENCODED_RUSTFLAGS").contains("link")
        && env("RUSTC_LINKER").is_empty();
    if env("PROFILE") != "release" || !lld {
        return;
    }
    println!("cargo::rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    if order.is_file() && env("DOCKERFLOW_SIDECAR_NO_SYMBOL_ORDER").is_empty() {
        println!(
            "cargo::rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo::rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
