//! A throwaway PostgreSQL server for the ledger's tests: a process of its
//! own on 127.0.0.1, on a port of its own (`ports`), its data in a
//! temporary directory, trust authentication for the user `tollgate`, no
//! fsync. It can be stopped and started again on the same port and data,
//! for outages.
//!
//! The binaries are Debian's (`/usr/lib/postgresql/*/bin`, the newest) or
//! on PATH. initdb and postgres refuse to run as root, so as root they run
//! as `nobody` (or `tollgate-test`, created if neither exists). Without the
//! binaries `Postgres::start` says SKIPPED and gives `None`, so the test
//! returns early; with `TOLLGATE_REQUIRE_SERVICES=1` it panics instead.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::certs::ServerTls;
use super::gateway::WAIT;
use super::ports::service_port;

pub struct Postgres {
    /// Holds `data` and the server's Unix socket.
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// The user and group the server runs as, when the tests run as root.
    run_as: Option<(u32, u32)>,
    server: Option<Child>,
    /// What the server logged, across starts.
    log: Arc<Mutex<Vec<String>>>,
    /// Its certificate and key, when it offers TLS, and the CA it checks
    /// client certificates against, when TLS connections need one.
    tls: Option<(PathBuf, PathBuf, Option<PathBuf>)>,
}

impl Postgres {
    /// A new server with an empty database, running; `None` (after a
    /// loud SKIPPED) without the binaries.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// As `start`, offering TLS beside plaintext. With
    /// `ServerTls::ClientsCertified`, a TLS connection is let in by a
    /// client certificate for its user (`cert` authentication) and by
    /// nothing else.
    pub fn start_tls(tls: ServerTls<'_>) -> Option<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(server_tls: Option<ServerTls<'_>>) -> Option<Self> {
        let Some(bin) = binaries() else {
            assert!(
                std::env::var("TOLLGATE_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "TOLLGATE_REQUIRE_SERVICES=1, but no PostgreSQL binaries (initdb, postgres) in \
                 /usr/lib/postgresql/*/bin or on PATH: install Debian's postgresql package"
            );
            eprintln!(
                "SKIPPED: postgres binaries not found (initdb, postgres in \
                 /usr/lib/postgresql/*/bin or on PATH); install Debian's postgresql package \
                 to run this test"
            );
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let run_as = unprivileged_if_root(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
        }
        let output = command(&bin.join("initdb"), dir.path(), run_as)
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "tollgate",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "initdb failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let tls = server_tls.map(|tls| {
            let (cert, key) = tls.ca().write_server_files(dir.path());
            let clients_ca = tls.clients_certified().then(|| {
                let copy = dir.path().join("clients-ca.pem");
                std::fs::copy(tls.ca().ca_file(), &copy).unwrap();
                let hba = data.join("pg_hba.conf");
                let rules = std::fs::read_to_string(&hba).unwrap();
                let certified = "hostssl all all 127.0.0.1/32 cert\n";
                std::fs::write(&hba, format!("{certified}{rules}")).unwrap();
                copy
            });
            if let Some((uid, gid)) = run_as {
                for file in [&cert, &key].into_iter().chain(&clients_ca) {
                    std::os::unix::fs::chown(file, Some(uid), Some(gid)).unwrap();
                }
            }
            (cert, key, clients_ca)
        });
        let mut postgres = Self {
            dir,
            bin,
            port: service_port(),
            run_as,
            server: None,
            log: Arc::default(),
            tls,
        };
        postgres.start_again();
        Some(postgres)
    }

    /// The URL gateways reach it at (no password: trust).
    pub fn url(&self) -> String {
        format!("postgres://tollgate@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server as an operator would (fast shutdown: connections
    /// are closed), and waits until it is gone.
    pub fn stop(&mut self) {
        let mut server = self.server.take().expect("the server is running");
        signal("INT", &server);
        server.wait().unwrap();
    }

    /// Starts the server again on the same port and data, and waits until
    /// it accepts connections.
    pub fn start_again(&mut self) {
        assert!(self.server.is_none(), "the server is already running");
        let logged_before = self.log.lock().unwrap().len();
        let mut postgres = command(&self.bin.join("postgres"), self.dir.path(), self.run_as);
        if let Some((cert, key, clients_ca)) = &self.tls {
            postgres.args([
                "-c".to_owned(),
                "ssl=on".to_owned(),
                "-c".to_owned(),
                format!("ssl_cert_file={}", cert.display()),
                "-c".to_owned(),
                format!("ssl_key_file={}", key.display()),
            ]);
            if let Some(ca) = clients_ca {
                postgres.args(["-c".to_owned(), format!("ssl_ca_file={}", ca.display())]);
            }
        }
        let mut server = postgres
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = BufReader::new(server.stderr.take().unwrap()).lines();
        let log = self.log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                log.lock().unwrap().push(line);
            }
        });
        let started = Instant::now();
        loop {
            let log = self.log.lock().unwrap();
            if log[logged_before..]
                .iter()
                .any(|l| l.contains("ready to accept connections"))
            {
                break;
            }
            if let Some(status) = server.try_wait().unwrap() {
                panic!("postgres exited ({status}):\n{}", log.join("\n"));
            }
            assert!(
                started.elapsed() < WAIT,
                "postgres did not start:\n{}",
                log.join("\n")
            );
            drop(log);
            std::thread::sleep(Duration::from_millis(20));
        }
        self.server = Some(server);
    }

    /// A client for what a test checks in the database itself.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
    }
}

impl Drop for Postgres {
    /// Immediate shutdown: the server and its backends exit at once.
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            signal("QUIT", &server);
            let started = Instant::now();
            while server.try_wait().ok().flatten().is_none() {
                if started.elapsed() > WAIT {
                    let _ = server.kill();
                    let _ = server.wait();
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

fn signal(name: &str, server: &Child) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(server.id().to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} failed");
}

/// `program` run from `dir`, as `run_as` if given.
fn command(program: &Path, dir: &Path, run_as: Option<(u32, u32)>) -> Command {
    let mut command = Command::new(program);
    command.current_dir(dir).env("LC_ALL", "C");
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    command
}

/// The directory holding `initdb` and `postgres`: Debian's newest, else
/// the one on PATH.
fn binaries() -> Option<PathBuf> {
    let has_both = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, bin)| has_both(bin))
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Some(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH")?).find(|dir| has_both(dir))
}

/// As root, the user and group to run PostgreSQL as: `nobody`, else
/// `tollgate-test` (created if missing). `probe` is a directory this
/// process just created, so its owner is who the tests run as.
fn unprivileged_if_root(probe: &Path) -> Option<(u32, u32)> {
    if std::fs::metadata(probe).unwrap().uid() != 0 {
        return None;
    }
    if let Some(ids) = user("nobody").or_else(|| user("tollgate-test")) {
        return Some(ids);
    }
    let status = Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--user-group",
            "tollgate-test",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "useradd tollgate-test failed");
    Some(user("tollgate-test").expect("tollgate-test was just created"))
}

/// A user's uid and primary gid, from /etc/passwd.
fn user(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}
