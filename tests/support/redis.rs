//! A throwaway Redis server for the fleet's tests: its own process on a
//! loopback port of its own (`ports`), with its data under a temp dir,
//! that a test can stop, start again and freeze. Redis comes from Debian's
//! `redis-server` package; without it the tests that need it are skipped,
//! loudly, unless `TOLLGATE_REQUIRE_SERVICES=1` (as `.ci/run` sets), when
//! they fail.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::certs::ServerTls;
use super::ports::service_port;

const BINARY: &str = "redis-server";

pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
    /// The port it also serves TLS on, its certificate and key, and the
    /// CA a TLS client's certificate must be signed by, when it needs one.
    tls: Option<(u16, PathBuf, PathBuf, Option<PathBuf>)>,
}

/// Whether a service binary is installed; `false` (after a loud message)
/// only when the run does not require it.
pub fn available(binary: &str, what: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    assert!(
        std::env::var("TOLLGATE_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "{binary} is not installed, and TOLLGATE_REQUIRE_SERVICES=1: install Debian's {what} package (.ci/run does)"
    );
    eprintln!(
        "\n=== SKIPPED: {binary} is not installed; this test needs a real {what} (apt-get install {what}) ===\n"
    );
    false
}

impl Redis {
    /// A fresh server, or `None` when Redis is not installed.
    pub fn start() -> Option<Self> {
        Self::start_with(None)
    }

    /// As `start`, serving TLS too, on a port of its own (`tls_url`).
    pub fn start_tls(tls: ServerTls<'_>) -> Option<Self> {
        Self::start_with(Some(tls))
    }

    fn start_with(server_tls: Option<ServerTls<'_>>) -> Option<Self> {
        if !available(BINARY, "redis-server") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let tls = server_tls.map(|tls| {
            let (cert, key) = tls.ca().write_server_files(dir.path());
            let clients_ca = tls.clients_certified().then(|| tls.ca().ca_file());
            (service_port(), cert, key, clients_ca)
        });
        let mut redis = Self {
            child: None,
            port: service_port(),
            dir,
            tls,
        };
        redis.start_again();
        Some(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The `rediss://` URL of its TLS port.
    pub fn tls_url(&self) -> String {
        let (port, ..) = self.tls.as_ref().expect("started with TLS");
        format!("rediss://127.0.0.1:{port}/0")
    }

    /// Starts the server (again) on its port and data dir; its
    /// append-only file keeps what it held when it stopped.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut command = Command::new(BINARY);
        if let Some((port, cert, key, clients_ca)) = &self.tls {
            command
                .arg("--tls-port")
                .arg(port.to_string())
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key);
            match clients_ca {
                Some(ca) => command
                    .arg("--tls-ca-cert-file")
                    .arg(ca)
                    .args(["--tls-auth-clients", "yes"]),
                None => command.args(["--tls-auth-clients", "no"]),
            };
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(self.dir.path())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--protected-mode",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while self.command("PING").as_deref() != Some("+PONG") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server as an operator or a crash would (SIGTERM; it
    /// writes its append-only file first).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the server: connections stay
    /// open and nothing answers, as with an overloaded Redis.
    pub fn freeze(&self, frozen: bool) {
        if let Some(child) = &self.child {
            signal(child, if frozen { "STOP" } else { "CONT" });
        }
    }

    /// One inline command (`GET key`), its first reply line; `None` when
    /// the server does not answer.
    pub fn command(&self, command: &str) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(format!("{command}\r\n").as_bytes()).ok()?;
        let mut reply = [0u8; 512];
        let n = stream.read(&mut reply).ok()?;
        let text = String::from_utf8_lossy(&reply[..n]);
        let mut lines = text.split("\r\n");
        let first = lines.next()?.to_owned();
        // A bulk string: its value is on the next line.
        if first.starts_with('$') && first != "$-1" {
            return lines.next().map(str::to_owned);
        }
        Some(first)
    }

    /// The integer in `field` of hash `key`, 0 when it is not set.
    pub fn hash_int(&self, key: &str, field: &str) -> i64 {
        match self.command(&format!("HGET {key} {field}")).as_deref() {
            Some("$-1") | None => 0,
            Some(value) => value.parse().unwrap_or(0),
        }
    }
}

fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(child.id().to_string())
        .status();
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "CONT");
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
