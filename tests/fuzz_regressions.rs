//! Inputs found with the fuzz targets (fuzz/, scripts/fuzz.sh), each pinned
//! against the library function the target calls.

use std::path::Path;

use dockerflow_sidecar::config::Config;

/// `Config::load_toml` on `toml`, which must be refused with an error that
/// names `key` and says the file is too large.
/// The error loading `toml` gives (a panic when it loads).
fn load_error(toml: &str) -> String {
    match Config::load_toml(Path::new("fuzz.toml"), toml) {
        Ok(_) => panic!("accepted:\n{toml}"),
        Err(e) => e.to_string(),
    }
}

fn refused_as_too_large(toml: &str, key: &str) {
    let err = load_error(toml);
    assert!(
        err.contains(key) && err.contains("larger than 1 MiB"),
        "{toml}\n→ {err}"
    );
}

// config_loader: a file named by the configuration was read whole, so a
// path such as /dev/zero (a stream that never ends) made the loader
// allocate until the process ran out of memory (libFuzzer: out-of-memory,
// malloc(2147483648)). Every such file is now read up to 1 MiB.

#[test]
fn an_admin_token_file_that_never_ends_is_refused() {
    refused_as_too_large("[admin]\ntoken_file = \"/dev/zero\"\n", "token_file");
}

#[test]
fn a_hook_secret_file_that_never_ends_is_refused() {
    refused_as_too_large(
        "[[hooks]]\nname = \"h\"\nevents = [\"heartbeat.failed\"]\nurl = \"http://x/\"\nsecret_file = \"/dev/zero\"\n",
        "hooks[0].secret_file",
    );
}

#[test]
fn a_check_url_file_that_never_ends_is_refused() {
    refused_as_too_large(
        "[[heartbeat.checks]]\nname = \"db\"\nkind = \"postgres\"\nurl_file = \"/dev/zero\"\n",
        "heartbeat.checks[0].url_file",
    );
}

#[test]
fn mail_password_and_ca_files_that_never_end_are_refused() {
    let mail = "[notify.email]\nhost = \"smtp.example.com\"\nadmins = [\"ops@example.com\"]\n";
    refused_as_too_large(
        &format!("{mail}username = \"u\"\npassword_file = \"/dev/zero\"\n"),
        "notify.email.password_file",
    );
    refused_as_too_large(
        &format!("{mail}ca_file = \"/dev/zero\"\n"),
        "notify.email.ca_file",
    );
}

#[test]
fn a_small_token_file_still_loads() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "s3cret\n").unwrap();
    let toml = format!("[admin]\ntoken_file = {:?}\n", file.display().to_string());
    let config = Config::load_toml(Path::new("fuzz.toml"), &toml).unwrap();
    assert_eq!(config.admin.token().unwrap().as_deref(), Some("s3cret"));
}

// template_renderer: nested loops ran 10^10 iterations (a hang at check-config,
// start-up, SIGHUP and in the sender). Renders now run on a fuel budget.

#[test]
fn a_template_that_would_run_for_hours_is_refused_at_once() {
    let toml = "[[hooks]]\nname = \"h\"\nevents = [\"heartbeat.failed\"]\nurl = \"http://x/\"\ncontent_type = \"text/plain\"\ntemplate = \"{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}\"\n";
    let started = std::time::Instant::now();
    let err = load_error(toml);
    assert!(
        err.contains("hooks[0].template") && err.contains("ran out of fuel"),
        "{err}"
    );
    // Bounded by the fuel, not by the loops: seconds at the very most.
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

// template_renderer: `format` with a 28-digit width asked for 2.9 EB and the
// failed allocation aborted the process (check-config, start-up, the sender).
#[test]
fn a_format_width_that_would_exhaust_memory_is_refused() {
    let toml = "[[hooks]]\nname = \"h\"\nevents = [\"heartbeat.failed\"]\nurl = \"http://x/\"\ncontent_type = \"text/plain\"\ntemplate = '{{ \"%s at %0000000000291084181163285253s\"|format(event.type, event.time) }}'\n";
    let err = load_error(toml);
    assert!(
        err.contains("hooks[0].template") && err.contains("more than 4 digits"),
        "{err}"
    );
    // A width that fits still renders.
    let fine = "[[hooks]]\nname = \"h\"\nevents = [\"heartbeat.failed\"]\nurl = \"http://x/\"\ncontent_type = \"text/plain\"\ntemplate = '{{ \"%-20s|%05d|%%12345\"|format(event.type, 42) }}'\n";
    if let Err(e) = Config::load_toml(Path::new("fuzz.toml"), fine) {
        panic!("refused: {e}");
    }
}
