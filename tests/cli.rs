//! The command line: --version, check-config, and configuration errors that
//! name the key, the source and what is valid.

mod common;

use std::process::{Command, Output};

fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(common::binary());
    cmd.args(args)
        .env_remove("PORT")
        .env_remove("DOCKERFLOW_CONFIG")
        .env_remove("DOCKERFLOW_UPSTREAM__URL")
        .env("DOCKERFLOW_ADMIN__LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn version_flag_prints_the_version() {
    let out = run(&["--version"], &[]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("dockerflow-sidecar {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn check_config_prints_the_merged_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[upstream]\nurl = \"http://127.0.0.1:1111\"\nconnect_timeout = \"3s\"\n[logging]\nlogger = \"from-file\"\n").unwrap();
    let out = run(
        &["check-config", "--config", file.to_str().unwrap()],
        &[("DOCKERFLOW_LOGGING__LOGGER", "from-env"), ("PORT", "9000")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: toml::Value = toml::from_str(&text(&out.stdout)).unwrap();
    assert_eq!(
        printed["listen"].as_str(),
        Some("0.0.0.0:9000"),
        "PORT sets the port"
    );
    assert_eq!(
        printed["upstream"]["url"].as_str(),
        Some("http://127.0.0.1:1111")
    );
    assert_eq!(printed["upstream"]["connect_timeout"].as_str(), Some("3s"));
    assert_eq!(
        printed["logging"]["logger"].as_str(),
        Some("from-env"),
        "env beats the file"
    );
    assert_eq!(
        printed["heartbeat"]["failed_status"].as_integer(),
        Some(500),
        "defaults fill the rest"
    );
}

#[test]
fn config_file_can_come_from_the_environment_and_upstream_flag_wins() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[upstream]\nurl = \"http://127.0.0.1:1111\"\n").unwrap();
    let from_env = run(
        &["check-config"],
        &[("DOCKERFLOW_CONFIG", file.to_str().unwrap())],
    );
    assert!(text(&from_env.stdout).contains("http://127.0.0.1:1111"));
    let flag = run(
        &["check-config", "--upstream", "unix:/run/app.sock"],
        &[
            ("DOCKERFLOW_CONFIG", file.to_str().unwrap()),
            ("DOCKERFLOW_UPSTREAM__URL", "http://127.0.0.1:2"),
        ],
    );
    assert!(
        text(&flag.stdout).contains("url = \"unix:/run/app.sock\""),
        "{}",
        text(&flag.stdout)
    );
}

#[test]
fn bad_value_in_the_file_names_key_file_line_and_what_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "# comment\n[heartbeat]\ndetails = \"everything\"\n").unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`heartbeat.details`"), "{err}");
    assert!(
        err.contains(&format!("{}, line 3", file.display())),
        "{err}"
    );
    assert!(err.contains("status, full"), "{err}");
}

#[test]
fn bad_value_from_the_environment_names_the_variable() {
    let out = run(
        &["check-config"],
        &[("DOCKERFLOW_UPSTREAM__CONNECT_TIMEOUT", "soon")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("`upstream.connect_timeout`"), "{err}");
    assert!(
        err.contains("environment variable DOCKERFLOW_UPSTREAM__CONNECT_TIMEOUT"),
        "{err}"
    );
    assert!(err.contains("a duration such as"), "{err}");
}

#[test]
fn unknown_keys_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.toml");
    std::fs::write(
        &file,
        "[upstream]\nurl = \"http://127.0.0.1:1\"\nconect_timeout = \"1s\"\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("`upstream.conect_timeout`") && err.contains("line 3"),
        "{err}"
    );
    assert!(
        err.contains("connect_timeout"),
        "lists the valid keys: {err}"
    );

    let out = run(
        &["check-config"],
        &[("DOCKERFLOW_UPSTREAM__URLL", "http://x:1")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("DOCKERFLOW_UPSTREAM__URLL"));
}

#[test]
fn bad_upstream_url_syntax_error_and_port_are_explained() {
    let out = run(&["check-config", "--upstream", "ftp://x:21"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("`upstream.url`")
            && err.contains("--upstream")
            && err.contains("unix:/path/to.sock"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("syntax.toml");
    std::fs::write(&file, "listen = \"0.0.0.0:1\"\n[upstream\n").unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("line 2: not valid TOML"),
        "{}",
        text(&out.stderr)
    );

    let out = run(&["check-config"], &[("PORT", "eighty")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("PORT"));

    let out = run(
        &["check-config", "--config", "/nonexistent/sidecar.toml"],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/sidecar.toml"));
}

#[test]
fn serve_refuses_to_start_on_a_bad_config() {
    let out = run(&["serve"], &[("DOCKERFLOW_HEARTBEAT__FAILED_STATUS", "42")]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("from 200 to 599"));

    let out = run(
        &["serve"],
        &[(
            "DOCKERFLOW_HEARTBEAT__CHECKS",
            r#"[{name="app", kind="upstream", path="health"}]"#,
        )],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("heartbeat.checks[0].path") && err.contains("starting with `/`"),
        "{err}"
    );
    assert!(err.contains("DOCKERFLOW_HEARTBEAT__CHECKS"), "{err}");
}

#[test]
fn listen_failure_is_reported() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = run(&[], &[("DOCKERFLOW_LISTEN", &addr)]);
    assert!(!out.status.success());
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("cannot listen on") && stdout.contains(&addr),
        "{stdout}"
    );
}

#[test]
fn an_address_another_process_shares_with_so_reuseport_is_refused() {
    // Another process listening with SO_REUSEPORT, as a second sidecar's
    // workers do: the kernel would let several workers join it and split the
    // connections with that process, silently.
    let taken = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    taken.set_reuse_port(true).unwrap();
    taken
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    taken.listen(16).unwrap();
    let addr = taken.local_addr().unwrap().as_socket().unwrap().to_string();
    // Spawned, not run to its end: a sidecar that wrongly starts serving
    // would never exit.
    let mut child = Command::new(common::binary())
        .env_remove("PORT")
        .env_remove("DOCKERFLOW_CONFIG")
        .env_remove("DOCKERFLOW_UPSTREAM__URL")
        .env("DOCKERFLOW_ADMIN__LISTEN", "127.0.0.1:0")
        .env("DOCKERFLOW_LISTEN", &addr)
        .env("DOCKERFLOW_SERVER__WORKER_THREADS", "2")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let end = std::time::Instant::now() + common::DEADLINE;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > end {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("the sidecar started serving on {addr}, which another process holds");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stdout = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
    assert!(
        stdout.contains("cannot listen on") && stdout.contains(&addr),
        "{stdout}"
    );
}

#[test]
fn heartbeat_checks_are_validated_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("[[heartbeat.checks]]\nname = \"db\"\nkind = \"mysql\"\n", "`heartbeat.checks[0].kind`", "upstream, http, tcp, postgres, redis, disk, file"),
        ("[[heartbeat.checks]]\nname = \"db\"\nkind = \"postgres\"\n", "`heartbeat.checks[0].url` (check `db`", "needs `url`"),
        (
            "[[heartbeat.checks]]\nname = \"a\"\nkind = \"tcp\"\nurl = \"tcp://x:1\"\n\n[[heartbeat.checks]]\nname = \"b\"\nkind = \"tcp\"\nurl = \"tcp://x:1\"\ntimeout = \"soon\"\n",
            "`heartbeat.checks[1].timeout`",
            "line 10",
        ),
        ("[[heartbeat.checks]]\nname = \"c\"\nkind = \"redis\"\nurl = \"http://x\"\n", "`heartbeat.checks[0].url`", "`redis://…`"),
        ("[[heartbeat.checks]]\nname = \"d\"\nkind = \"disk\"\npath = \"/\"\nmin_free = \"lots\"\n", "`heartbeat.checks[0].min_free`", "10%"),
        ("[[heartbeat.checks]]\nname = \"e\"\nkind = \"file\"\npath = \"/x\"\nquery = \"SELECT 1\"\n", "`heartbeat.checks[0].query`", "does not apply"),
    ];
    for (i, (toml, key, hint)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&file, toml).unwrap();
        let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = text(&out.stderr);
        assert!(err.contains(key) && err.contains(hint), "{toml}\n→ {err}");
    }
}

#[test]
fn check_config_masks_passwords_in_check_urls() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[[heartbeat.checks]]\nname = \"db\"\nkind = \"postgres\"\nurl = \"postgres://app:hunter2@db:5432/app\"\n\n\
         [[heartbeat.checks]]\nname = \"db2\"\nkind = \"postgres\"\nurl = \"postgres://app@db:5432/app?password=swordfish\"\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(
        !printed.contains("hunter2") && !printed.contains("swordfish"),
        "{printed}"
    );
    assert!(
        printed.contains("postgres://app:********************@db:5432/app"),
        "{printed}"
    );
}

#[test]
fn errors_and_mail_settings_are_validated_with_the_key_named() {
    let dir = tempfile::tempdir().unwrap();
    let mail = "[notify.email]\nhost = \"smtp.example.com\"\nadmins = [\"ops@example.com\"]\n";
    let cases = [
        (
            "[errors]\nserver_error_statuses = [\"5xx\"]\n",
            "`errors.server_error_statuses`",
            "ranges such as \"500-599\"",
        ),
        (
            "[errors]\nignorable_404_urls = [\"\\\\.php$\", \"(\"]\n",
            "`errors.ignorable_404_urls",
            "`(` is not a valid regex",
        ),
        (
            "[errors]\ninternal_ips = [\"10.0.0.0/33\"]\n",
            "`errors.internal_ips",
            "10.0.0.0/8",
        ),
        (
            "[errors]\nresponse_body_bytes = 1000000\n",
            "`errors.response_body_bytes`",
            "at most 65536",
        ),
        (
            "[notify.email]\nhost = \"smtp.example.com\"\ntls = \"ssl\"\nadmins = [\"a@b.c\"]\n",
            "`notify.email.tls`",
            "starttls",
        ),
        (
            "[notify.email]\nhost = \"smtp.example.com\"\nadmins = [\"not an address\"]\n",
            "`notify.email.admins`",
            "line 3",
        ),
        (
            "[notify.email]\nhost = \"smtp.example.com\"\n",
            "`notify.email.host`",
            "nobody would get mail",
        ),
        (
            &format!("{mail}password = \"x\"\n"),
            "`notify.email.username`",
            "needs both",
        ),
        (
            &format!("{mail}username = \"u\"\npassword_file = \"/nonexistent/pw\"\n"),
            "`notify.email.password_file`",
            "/nonexistent/pw",
        ),
    ];
    for (i, (toml, key, hint)) in cases.iter().enumerate() {
        let file = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&file, toml).unwrap();
        let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
        assert_eq!(out.status.code(), Some(2), "{toml}");
        let err = text(&out.stderr);
        assert!(err.contains(key) && err.contains(hint), "{toml}\n→ {err}");
    }
    // From the environment, the variable is named.
    let out = run(
        &["check-config"],
        &[("DOCKERFLOW_NOTIFY__EMAIL__MAX_PER_WINDOW", "many")],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains("DOCKERFLOW_NOTIFY__EMAIL__MAX_PER_WINDOW"),
        "{err}"
    );
}

#[test]
fn check_config_masks_the_smtp_password() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "[notify.email]\nhost = \"smtp.example.com\"\nusername = \"u\"\npassword = \"hunter2\"\nadmins = [\"ops@example.com\"]\n",
    )
    .unwrap();
    let out = run(&["check-config", "--config", file.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed = text(&out.stdout);
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(
        printed.contains("password = \"********************\""),
        "{printed}"
    );
}

/// template_renderer found `{{ [1] * 100000000000000 }}`: printing a lazy
/// sequence of 10^14 items is one instruction of fuel, and check-config
/// hung on it; `2 in` such a sequence hangs the compiler (which folds
/// constants). Compiling and the sample renders now have a time limit
/// (3 s), and the process exits with the error, taking the stuck thread
/// with it.
#[test]
fn check_config_refuses_a_template_that_would_never_finish() {
    for template in [
        "{{ [1] * 100000000000000 }}",
        "{{ 2 in [1] * 100000000000000 }}",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sidecar.toml");
        std::fs::write(
            &file,
            format!(
                "[[hooks]]\nname = \"h\"\nevents = [\"heartbeat.failed\"]\nurl = \"http://x/\"\n\
                 content_type = \"text/plain\"\ntemplate = \"{template}\"\n"
            ),
        )
        .unwrap();
        let mut cmd = Command::new(common::binary());
        cmd.args(["check-config", "--config", file.to_str().unwrap()])
            .env_remove("DOCKERFLOW_CONFIG")
            .env("DOCKERFLOW_ADMIN__LISTEN", "127.0.0.1:0")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let child = cmd.spawn().unwrap();
        let pid = child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(child.wait_with_output()));
        // Without the limit this never returns: the deadline turns that into
        // a failure (and kills the process) instead of a hung test run.
        let out = match rx.recv_timeout(std::time::Duration::from_secs(60)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
                panic!("{template}: check-config still running after 60 s");
            }
        };
        let stderr = text(&out.stderr);
        assert!(!out.status.success(), "{template}: {stderr}");
        assert!(
            stderr.contains("hooks[0].template") && stderr.contains("samples within 3 s"),
            "{template}: {stderr}"
        );
    }
}
