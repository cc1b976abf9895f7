//! `tollgate check` and `tollgate serve` on the real binary: the shipped
//! configs pass, a missing secret or a broken config is refused with every
//! problem named by its location.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// No run of the binary here should take more than a moment; past this it
/// is killed and the test fails instead of hanging.
const TIMEOUT: Duration = Duration::from_secs(30);

const PRODUCTION: &str = "config/examples/production.toml";

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tollgate() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.current_dir(manifest_dir())
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs the command to completion, killing it if it outlives `TIMEOUT`.
/// Both pipes are drained on their own threads so the child never blocks
/// on a full pipe.
fn run(mut cmd: Command) -> Output {
    let mut child = cmd.spawn().expect("the tollgate binary starts");
    let mut out = child.stdout.take().expect("stdout is piped");
    let mut err = child.stderr.take().expect("stderr is piped");
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting on the child") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "tollgate did not exit within {TIMEOUT:?}; stderr so far:\n{}",
                err.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        code: status.code(),
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// Every environment variable the config names, with the path of the field
/// that names it (`backends[3].api_key_env`, `keys[0].key_env`). Read from
/// the file itself so the test follows the example as it changes.
fn secret_vars(config: &Path) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(config).expect("config is readable");
    let doc: toml::Table = text.parse().expect("config is valid TOML");
    let mut vars = Vec::new();
    for (list, field) in [
        ("backends", "api_key_env"),
        ("backends", "aws_access_key_id_env"),
        ("backends", "aws_secret_access_key_env"),
        ("backends", "aws_session_token_env"),
        ("keys", "key_env"),
    ] {
        let Some(items) = doc.get(list).and_then(toml::Value::as_array) else {
            continue;
        };
        for (i, item) in items.iter().enumerate() {
            if let Some(var) = item.get(field).and_then(toml::Value::as_str) {
                vars.push((var.to_owned(), format!("{list}[{i}].{field}")));
            }
        }
    }
    vars
}

/// `check --config <production>` with every named variable set to its own
/// dummy value (keys must differ, or they collide), except `missing`.
fn check_production(vars: &[(String, String)], missing: Option<&str>) -> Output {
    let mut cmd = tollgate();
    cmd.args(["check", "--config", PRODUCTION]);
    for (var, _) in vars {
        if Some(var.as_str()) == missing {
            cmd.env_remove(var);
        } else {
            cmd.env(var, format!("dummy-value-of-{var}"));
        }
    }
    run(cmd)
}

#[test]
fn production_example_passes_with_its_secrets_set() {
    let vars = secret_vars(&manifest_dir().join(PRODUCTION));
    assert!(
        vars.iter().any(|(_, path)| path.starts_with("backends"))
            && vars.iter().any(|(_, path)| path.starts_with("keys")),
        "the example names backend and key secrets: {vars:?}"
    );
    let out = check_production(&vars, None);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    assert!(
        out.stdout.contains(&format!("{PRODUCTION}: ok (")),
        "stdout:\n{}",
        out.stdout
    );
}

#[test]
fn production_example_names_each_missing_secret_and_its_path() {
    let vars = secret_vars(&manifest_dir().join(PRODUCTION));
    assert!(!vars.is_empty());
    for (var, path) in &vars {
        let out = check_production(&vars, Some(var));
        assert_eq!(out.code, Some(1), "missing {var}: stdout:\n{}", out.stdout);
        let expected = format!("{path}: environment variable {var} is not set");
        assert!(
            out.stderr.contains(&expected),
            "missing {var}: expected {expected:?} in stderr:\n{}",
            out.stderr
        );
        assert!(
            out.stderr.contains("1 problem(s)"),
            "missing {var}: only that one problem is reported:\n{}",
            out.stderr
        );
        assert!(!out.stdout.contains(": ok ("), "stdout:\n{}", out.stdout);
    }
}

#[test]
fn check_without_config_uses_the_default_config() {
    let mut cmd = tollgate();
    cmd.arg("check");
    let out = run(cmd);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    assert!(
        out.stdout.contains("config/tollgate.toml: ok ("),
        "stdout:\n{}",
        out.stdout
    );
}

/// Three problems: an unknown key, a duplicate backend name, and a
/// deployment naming a backend that does not exist.
const BROKEN: &str = r#"
[server]
listen = "127.0.0.1:0"

[[backends]]
name = "vllm-us"
kind = "vllm"
base_url = "http://127.0.0.1:9/v1"
regoin = "us-east-1"

[[backends]]
name = "vllm-us"
kind = "vllm"
base_url = "http://127.0.0.1:9/v1"

[[models]]
alias = "llama-3.3-70b"
[[models.deployments]]
backend = "vllm-us"
model = "meta-llama/Llama-3.3-70B-Instruct"
context_window = 131072

[[models]]
alias = "llama-3.1-8b"
[[models.deployments]]
backend = "vllm-eu"
model = "meta-llama/Llama-3.1-8B-Instruct"
context_window = 131072
"#;

const BROKEN_PROBLEMS: [&str; 3] = [
    "backends[0].regoin: unknown key",
    "backends[1].name: \"vllm-us\" is defined twice",
    "models[1].deployments[0].backend: no backend named \"vllm-eu\"",
];

fn broken_config() -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), BROKEN).expect("write temp config");
    file
}

fn assert_lists_every_problem(out: &Output) {
    assert_eq!(out.code, Some(1), "stdout:\n{}", out.stdout);
    for problem in BROKEN_PROBLEMS {
        assert!(
            out.stderr
                .lines()
                .any(|l| l.trim_start().starts_with(problem)),
            "missing {problem:?} in stderr:\n{}",
            out.stderr
        );
    }
    assert!(
        out.stderr
            .contains(&format!("{} problem(s)", BROKEN_PROBLEMS.len())),
        "no other problems are reported:\n{}",
        out.stderr
    );
}

#[test]
fn check_lists_every_problem_of_a_broken_config() {
    let file = broken_config();
    let mut cmd = tollgate();
    cmd.arg("check").arg("--config").arg(file.path());
    let out = run(cmd);
    assert_lists_every_problem(&out);
    assert!(!out.stdout.contains(": ok ("), "stdout:\n{}", out.stdout);
}

#[test]
fn serve_refuses_to_start_on_a_broken_config() {
    let file = broken_config();
    let mut cmd = tollgate();
    // An ephemeral port, so a server that wrongly started could not clash
    // with anything; the timeout in `run` stops it.
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(file.path());
    let out = run(cmd);
    assert_lists_every_problem(&out);
    assert!(
        out.stderr.contains("refusing to start"),
        "stderr:\n{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("tollgate listening"),
        "stderr:\n{}",
        out.stderr
    );
}
