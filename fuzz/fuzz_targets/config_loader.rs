#![no_main]
//! The configuration loader on arbitrary TOML text: defaults < the text (as
//! if it were the file `fuzz.toml`) < `DOCKERFLOW_*` (none set by
//! scripts/fuzz.sh), with every validation rule. It must return a `Config`
//! or a `ConfigError`, never panic.
//!
//! Beyond that: an error always says something; an accepted configuration
//! obeys the cross-key rules `Config::load` enforces; and `check-config`'s
//! masked TOML of it is valid TOML.

use std::path::Path;

use dockerflow_sidecar::config::{masked_toml, Config};
use dockerflow_sidecar::events::KINDS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // `Config::load` reads the file as UTF-8; anything else is `Unreadable`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::load_toml(Path::new("fuzz.toml"), text) {
        Ok(config) => {
            check(&config);
            let masked = masked_toml(&config);
            if let Err(e) = masked.parse::<toml::Table>() {
                panic!("check-config prints invalid TOML ({e}):\n{masked}");
            }
        }
        Err(e) => assert!(!e.to_string().trim().is_empty()),
    }
});

/// The rules `Config::load` checks after deserializing.
fn check(config: &Config) {
    let mut names = std::collections::HashSet::new();
    for hook in &config.hooks {
        assert!(!hook.name.trim().is_empty());
        assert!(names.insert(&hook.name), "two hooks named {:?}", hook.name);
        assert!(!hook.events.is_empty());
        assert!(hook.events.iter().all(|e| KINDS.contains(&e.as_str())));
    }
    assert!(config.delivery.concurrency >= 1);
    let tls = &config.tls;
    assert_eq!(
        tls.cert.as_os_str().is_empty(),
        tls.key.as_os_str().is_empty()
    );
    assert!(!tls.reload_interval.is_zero());
}
