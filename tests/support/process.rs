//! The tollgate binary run as a real process, for what only a process
//! shows: signals, crashes, restarts.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::config::Config;

pub struct Process {
    pub child: Child,
    /// `http://127.0.0.1:PORT`, from the address it logs.
    pub base: String,
    /// The line the server logs once it listens.
    pub listening: String,
    /// Every other line it logged.
    log: Arc<Mutex<Vec<String>>>,
    _config: Option<tempfile::NamedTempFile>,
}

impl Process {
    /// Waits, within `WAIT`, for a logged line that contains `text`.
    pub fn logged(&self, text: &str) -> String {
        let started = Instant::now();
        loop {
            let log = self.log.lock().unwrap();
            if let Some(line) = log.iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            assert!(
                started.elapsed() < super::gateway::WAIT,
                "no log line contains {text:?}:\n{}",
                log.join("\n")
            );
            drop(log);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Process {
    /// Waits, within `WAIT`, until `count` logged lines contain `text`;
    /// returns every line logged so far.
    pub fn lines_once(&self, text: &str, count: usize) -> Vec<String> {
        let started = Instant::now();
        loop {
            let log = self.log.lock().unwrap();
            if log.iter().filter(|l| l.contains(text)).count() >= count {
                return log.clone();
            }
            assert!(
                started.elapsed() < super::gateway::WAIT,
                "fewer than {count} log lines contain {text:?}"
            );
            drop(log);
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Process {
    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        reqwest::get(format!("{}/metrics", self.base))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends the process a signal by `kill`'s name for it (`-TERM`).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([name, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until the process exits, failing after `within`.
    pub fn wait_exit(&mut self, within: std::time::Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the server did not exit in time");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `tollgate serve --config PATH` on a port the OS picks, with `env` added
/// to its environment.
pub fn serve_file(config: &Path, env: &[(&str, &str)]) -> Process {
    spawn(Command::new(binary()), config, env)
}

/// The binary these processes run: the one cargo built for the tests, or
/// another build of it that `TOLLGATE_TEST_BIN` names (the shipped one,
/// which `deploy/release/build.sh` checks this way).
pub fn binary() -> PathBuf {
    std::env::var_os("TOLLGATE_TEST_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_tollgate")),
        PathBuf::from,
    )
}

/// `program` (the tollgate binary, or a command that runs it) with the
/// arguments of `serve`.
fn spawn(mut program: Command, config: &Path, env: &[(&str, &str)]) -> Process {
    let mut child = program
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut before = Vec::new();
    let (base, listening) = loop {
        let Some(line) = lines.next() else {
            panic!(
                "the server exited before logging its address:\n{}",
                before.join("\n")
            );
        };
        let line = line.unwrap();
        // As text, `addr=IP:PORT`; as JSON, `"addr":"IP:PORT"`.
        if let Some(rest) = line.split("addr=").nth(1) {
            let base = format!("http://{}", rest.split_whitespace().next().unwrap());
            break (base, line);
        }
        if let Some(rest) = line.split("\"addr\":\"").nth(1) {
            let base = format!("http://{}", rest.split('"').next().unwrap());
            break (base, line);
        }
        before.push(line);
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    let log = Arc::new(Mutex::new(before));
    let kept = log.clone();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            kept.lock().unwrap().push(line);
        }
    });
    Process {
        child,
        base,
        listening,
        log,
        _config: None,
    }
}

/// Like [`serve_file`], on `config`.
pub fn serve_config(config: &Config) -> Process {
    let file = written(config);
    let mut process = serve_file(file.path(), &[]);
    process._config = Some(file);
    process
}

/// Like [`serve_config`], with the process allowed only one CPU
/// (`taskset`), as when pinned or given one CPU by a container.
pub fn serve_config_on_one_cpu(config: &Config) -> Process {
    let file = written(config);
    let mut taskset = Command::new("taskset");
    taskset.args(["-c", "0"]).arg(binary());
    let mut process = spawn(taskset, file.path(), &[]);
    process._config = Some(file);
    process
}

/// `config` in a file that lives as long as the process serving it.
fn written(config: &Config) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config.to_toml()).unwrap();
    file
}

/// Runs a command of the binary (`simulate …`, `licence-report …`) from
/// the crate's root to its end; it must succeed. What it printed.
pub fn run_ok(args: &[&str]) -> String {
    let output = Command::new(binary())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "tollgate {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}
