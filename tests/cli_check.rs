//! `tollgate check` and `tollgate serve` on the real binary: the shipped
//! configs pass, a missing secret or a broken config is refused with every
//! problem named by its path and line, and `check` refuses a ledger
//! directory `serve` could not write.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::config::line_of;

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
    let mut cmd = Command::new(support::process::binary());
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

/// Every environment variable the config names (every `*_env` field, at any
/// depth), with the path of the field that names it
/// (`backends[3].api_key_env`, `keys[0].key_env`, `admin.token_env`). Read
/// from the file itself so the test follows the example as it changes.
fn secret_vars(config: &Path) -> Vec<(String, String)> {
    fn walk(value: &toml::Value, path: &str, vars: &mut Vec<(String, String)>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    match value.as_str() {
                        Some(var) if key.ends_with("_env") => vars.push((var.to_owned(), path)),
                        _ => walk(value, &path, vars),
                    }
                }
            }
            toml::Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    walk(item, &format!("{path}[{i}]"), vars);
                }
            }
            _ => {}
        }
    }
    let text = std::fs::read_to_string(config).expect("config is readable");
    let doc = toml::Value::Table(text.parse().expect("config is valid TOML"));
    let mut vars = Vec::new();
    walk(&doc, "", &mut vars);
    vars
}

/// `check --config <config>` (the production example) with every named
/// variable set to its own dummy value (keys must differ, or they
/// collide), except `missing`.
fn check_production(config: &Path, vars: &[(String, String)], missing: Option<&str>) -> Output {
    let mut cmd = tollgate();
    cmd.arg("check").arg("--config").arg(config);
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
    // Its ledger is in /var/lib/tollgate, the machine's and not a test's
    // to write: `check` would refuse it where the test may not.
    let ledger = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(manifest_dir().join(PRODUCTION)).unwrap();
    let here = text.replace(
        "data_dir = \"/var/lib/tollgate\"",
        &format!("data_dir = \"{}\"", ledger.path().display()),
    );
    assert_ne!(
        here, text,
        "the example keeps its ledger in /var/lib/tollgate"
    );
    let file = temp_config(&here);
    let out = check_production(file.path(), &vars, None);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    assert!(
        out.stdout
            .contains(&format!("{}: ok (", file.path().display())),
        "stdout:\n{}",
        out.stdout
    );
}

#[test]
fn production_example_names_each_missing_secret_and_its_path() {
    let vars = secret_vars(&manifest_dir().join(PRODUCTION));
    assert!(!vars.is_empty());
    for (var, path) in &vars {
        let out = check_production(Path::new(PRODUCTION), &vars, Some(var));
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
name = "vllm-us" # again
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

/// Each problem, and the start of the line of `BROKEN` it is on.
const BROKEN_PROBLEMS: [(&str, &str); 3] = [
    ("backends[0].regoin: unknown key", "regoin ="),
    (
        "backends[1].name: \"vllm-us\" is defined twice",
        "name = \"vllm-us\" # again",
    ),
    (
        "models[1].deployments[0].backend: no backend named \"vllm-eu\"",
        "backend = \"vllm-eu\"",
    ),
];

fn broken_config() -> tempfile::NamedTempFile {
    temp_config(BROKEN)
}

/// The line of stderr that starts with `problem` (once indented under
/// its file, as problems are).
fn line_starting<'o>(out: &'o Output, problem: &str) -> &'o str {
    out.stderr
        .lines()
        .find(|l| l.trim_start().starts_with(problem))
        .unwrap_or_else(|| panic!("missing {problem:?} in stderr:\n{}", out.stderr))
}

fn assert_lists_every_problem(out: &Output) {
    assert_eq!(out.code, Some(1), "stdout:\n{}", out.stdout);
    for (problem, written) in BROKEN_PROBLEMS {
        let line = line_starting(out, problem);
        let at = format!(" (line {}, column 1)", line_of(BROKEN, written));
        assert!(line.ends_with(&at), "{problem:?} is not at{at}: {line}");
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

/// As a reload refuses a truncated file, `check` and `serve` refuse an
/// empty one: `check` before a restart must not pass it.
#[test]
fn an_empty_config_file_is_refused_by_check_and_serve() {
    let file = temp_config(" \n\n");
    for command in ["check", "serve"] {
        let mut cmd = tollgate();
        cmd.arg(command).arg("--config").arg(file.path());
        if command == "serve" {
            cmd.arg("--listen").arg("127.0.0.1:0");
        }
        let out = run(cmd);
        assert_eq!(out.code, Some(1), "{command}: {}", out.stderr);
        assert!(
            out.stderr.contains("is empty, as a truncated file is"),
            "{command}: {}",
            out.stderr
        );
    }
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

/// Valid, but with no keys on an address other hosts reach, in front of a
/// vLLM server: anyone on the network could use its GPUs.
const OPEN: &str = r#"
[server]
listen = "0.0.0.0:8080"

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
"#;

#[test]
fn a_gateway_without_keys_is_never_opened_to_the_network_by_accident() {
    let open = temp_config(OPEN);
    let problem = "keys: there are no [[keys]] and the gateway listens on";
    let mut check = tollgate();
    check.arg("check").arg("--config").arg(open.path());
    let out = run(check);
    assert_eq!(out.code, Some(1), "stdout:\n{}", out.stdout);
    assert!(
        out.stderr.contains(&format!("{problem} 0.0.0.0:8080")),
        "{}",
        out.stderr
    );
    for address in ["0.0.0.0:0", "[::]:0"] {
        let mut serve = tollgate();
        serve
            .args(["serve", "--listen", address, "--config"])
            .arg(open.path());
        let out = run(serve);
        assert_eq!(out.code, Some(1), "{address}: {}", out.stderr);
        assert!(
            out.stderr.contains("refusing to start") && out.stderr.contains(problem),
            "{address}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("tollgate listening"), "{}", out.stderr);
    }
    // On loopback it serves, as it does when the config says it is meant.
    let gateway = support::process::serve_file(open.path(), &[]);
    assert!(
        gateway.listening.contains("127.0.0.1:"),
        "{}",
        gateway.listening
    );
    let said = temp_config(&OPEN.replacen("[server]\n", "[server]\nallow_anonymous = true\n", 1));
    let mut check = tollgate();
    check.arg("check").arg("--config").arg(said.path());
    let out = run(check);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// Valid, but an EU user could reach a multimodal Llama: Llama 4 Scout
/// under another licence and not marked multimodal, and a key with no
/// region whose callers may choose one, with no `policy.default_region`.
const RISKY: &str = r#"
[[backends]]
name = "sim"
kind = "simulated"

[[models]]
alias = "vision"
[[models.deployments]]
backend = "sim"
model = "meta-llama/Llama-3.2-11B-Vision-Instruct"
context_window = 8192
licence = "Llama"
multimodal = true
modalities = ["text", "image"]

[[models]]
alias = "scout"
[[models.deployments]]
backend = "sim"
model = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
context_window = 8192
licence = "qwen"

[[keys]]
name = "anywhere"
sha256 = "5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b"
models = ["*"]
region_header = true
"#;

const RISKY_WARNINGS: [&str; 4] = [
    "warning: models[1].deployments[0].licence: upstream model \"meta-llama/Llama-4-Scout-17B-16E-Instruct\" is a Llama model",
    "warning: models[1].deployments[0].multimodal: upstream model \"meta-llama/Llama-4-Scout-17B-16E-Instruct\" is a multimodal Llama",
    "warning: keys[0].region_header: callers of key \"anywhere\" choose their region",
    "warning: keys[0].region: key \"anywhere\" has no region and policy.default_region is unset",
];

fn temp_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    std::fs::write(file.path(), text).expect("write temp config");
    file
}

#[test]
fn check_warns_where_an_eu_user_could_reach_a_multimodal_llama() {
    let file = temp_config(RISKY);
    let check = |strict: bool| {
        let mut cmd = tollgate();
        cmd.arg("check").arg("--config").arg(file.path());
        if strict {
            cmd.arg("--strict");
        }
        run(cmd)
    };
    let out = check(false);
    assert_eq!(out.code, Some(0), "warnings do not fail:\n{}", out.stderr);
    assert!(out.stdout.contains(": ok ("), "stdout:\n{}", out.stdout);
    for warning in RISKY_WARNINGS {
        assert!(
            out.stderr.lines().any(|l| l.starts_with(warning)),
            "missing {warning:?} in stderr:\n{}",
            out.stderr
        );
    }
    assert_eq!(
        out.stderr.matches("warning: ").count(),
        RISKY_WARNINGS.len(),
        "{}",
        out.stderr
    );
    let strict = check(true);
    assert_eq!(strict.code, Some(1), "--strict fails on warnings");
    assert!(strict.stderr.contains("4 warning(s)"), "{}", strict.stderr);

    // A default region and a key that may not choose silence the key
    // warnings; the shipped configs have none at all.
    let fixed = temp_config(
        &RISKY
            .replace("region_header = true", "")
            .replace("[[keys]]", "[policy]\ndefault_region = \"eu\"\n\n[[keys]]"),
    );
    let mut cmd = tollgate();
    cmd.arg("check")
        .arg("--strict")
        .arg("--config")
        .arg(fixed.path());
    let out = run(cmd);
    assert_eq!(out.stderr.matches("warning: ").count(), 2, "{}", out.stderr);
    let mut cmd = tollgate();
    cmd.args(["check", "--strict", "--offline", "--config", PRODUCTION]);
    let out = run(cmd);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
}

/// The EU rule matches region names exactly, so a key or default region
/// named for a place in Europe but left out of `policy.eu_regions` is
/// served by the multimodal Llama: warned, until `eu_regions` names it.
#[test]
fn check_warns_of_a_region_in_europe_the_eu_rule_does_not_name() {
    let vision = r#"
[[backends]]
name = "sim"
kind = "simulated"

[[models]]
alias = "vision"
[[models.deployments]]
backend = "sim"
model = "meta-llama/Llama-4-Scout-17B-16E-Instruct"
context_window = 8192
licence = "llama"
multimodal = true

[[keys]]
name = "paris"
sha256 = "5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b"
models = ["*"]
region = "eu-west-3"

[[keys]]
name = "ohio"
sha256 = "6b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b"
models = ["*"]
region = "us-east-2"

[policy]
default_region = "europe-west4"
"#;
    let check = |text: &str| {
        let file = temp_config(text);
        let mut cmd = tollgate();
        cmd.arg("check")
            .arg("--strict")
            .arg("--config")
            .arg(file.path());
        run(cmd)
    };
    let out = check(vision);
    assert_eq!(out.code, Some(1), "{}", out.stderr);
    for (path, region) in [
        ("policy.default_region", "europe-west4"),
        ("keys[0].region", "eu-west-3"),
    ] {
        let line = line_starting(&out, &format!("warning: {path}: "));
        assert!(line.contains(&format!("\"{region}\"")), "{line}");
        assert!(line.contains("not in policy.eu_regions"), "{line}");
    }
    assert_eq!(out.stderr.matches("warning: ").count(), 2, "{}", out.stderr);
    let named = vision.replace(
        "[policy]",
        "[policy]\neu_regions = [\"eu\", \"eu-west-3\", \"europe-west4\"]",
    );
    let out = check(&named);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

/// A warning is placed at the line its path is written on; one about a
/// value the file leaves to its default has no line to give.
#[test]
fn check_places_each_warning_at_its_line_and_a_default_nowhere() {
    let file = temp_config(RISKY);
    let mut cmd = tollgate();
    cmd.arg("check").arg("--config").arg(file.path());
    let out = run(cmd);
    assert_eq!(out.code, Some(0), "{}", out.stderr);
    let placed = [
        (RISKY_WARNINGS[0], Some("licence = \"qwen\"")),
        (RISKY_WARNINGS[1], None),
        (RISKY_WARNINGS[2], Some("region_header = true")),
        (RISKY_WARNINGS[3], None),
    ];
    for (warning, written) in placed {
        let line = line_starting(&out, warning);
        match written {
            Some(written) => {
                let at = format!(" (line {}, column 1)", line_of(RISKY, written));
                assert!(line.ends_with(&at), "not at{at}: {line}");
            }
            None => assert!(!line.contains("(line "), "{line}"),
        }
    }
}

/// Valid, and without warnings.
const SIMULATED: &str = r#"
[[backends]]
name = "sim"
kind = "simulated"

[[models]]
alias = "chat"
[[models.deployments]]
backend = "sim"
model = "m"
context_window = 8192
"#;

/// `SIMULATED` with its ledger in `data_dir`.
fn ledger_in(data_dir: &Path) -> tempfile::NamedTempFile {
    temp_config(&format!(
        "[ledger]\ndata_dir = \"{}\"\n{SIMULATED}",
        data_dir.display()
    ))
}

fn check_file(file: &Path, offline: bool) -> Output {
    let mut cmd = tollgate();
    cmd.arg("check").arg("--config").arg(file);
    if offline {
        cmd.arg("--offline");
    }
    run(cmd)
}

/// The entries of `dir`, sorted.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    entries
}

/// `serve` keeps its ledger in `[ledger] data_dir`, making the directory
/// and any missing above it: `check` refuses a data_dir it could not
/// write, naming the key, the path and its line, where `serve` would fail
/// to start; and makes nothing, there or above.
#[test]
fn check_refuses_a_data_dir_serve_could_not_write_and_leaves_nothing_behind() {
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join("file");
    std::fs::write(&file, "").unwrap();
    let under_a_file = file.join("ledger");
    let cases = [
        (
            file.clone(),
            format!("ledger.data_dir: {} is not a directory; ", file.display()),
        ),
        (
            under_a_file.clone(),
            format!(
                "ledger.data_dir: {} does not exist and cannot be created: {} is not a directory; ",
                under_a_file.display(),
                file.display()
            ),
        ),
    ];
    for (data_dir, refused) in cases {
        let config = ledger_in(&data_dir);
        let out = check_file(config.path(), false);
        assert_eq!(out.code, Some(1), "{}", out.stdout);
        assert!(out.stderr.contains("1 problem(s)"), "{}", out.stderr);
        let line = line_starting(&out, &refused);
        assert!(line.ends_with(" (line 2, column 1)"), "{line}");
        assert!(!out.stdout.contains(": ok ("), "{}", out.stdout);
        // As `serve` finds it.
        let mut serve = tollgate();
        serve
            .args(["serve", "--listen", "127.0.0.1:0", "--config"])
            .arg(config.path());
        let served = run(serve);
        assert_eq!(served.code, Some(1), "{}", served.stderr);
        assert!(
            served.stderr.contains("cannot create ledger directory"),
            "{}",
            served.stderr
        );
        // Offline, it is the file that is checked, not the machine.
        assert_eq!(check_file(config.path(), true).code, Some(0));
    }

    let existing = root.path().join("ledger");
    std::fs::create_dir(&existing).unwrap();
    std::fs::write(existing.join("tollgate-ledger.sqlite3"), "").unwrap();
    let before = (entries(root.path()), entries(&existing));
    for data_dir in [existing.clone(), root.path().join("a/b/ledger")] {
        let out = check_file(ledger_in(&data_dir).path(), false);
        assert_eq!(out.code, Some(0), "{}: {}", data_dir.display(), out.stderr);
    }
    assert_eq!(
        (entries(root.path()), entries(&existing)),
        before,
        "nothing made, nothing left"
    );
}

/// CI has no production secrets: `check --offline` and `explain` check
/// everything else; plain `check` still needs them.
#[test]
fn offline_check_and_explain_need_no_secrets() {
    let vars = secret_vars(&manifest_dir().join(PRODUCTION));
    let without_secrets = |args: &[&str]| {
        let mut cmd = tollgate();
        cmd.args(args);
        for (var, _) in &vars {
            cmd.env_remove(var);
        }
        run(cmd)
    };
    let out = without_secrets(&["check", "--offline", "--config", PRODUCTION]);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    assert!(out.stdout.contains(&format!("{PRODUCTION}: ok (")));
    let out = without_secrets(&["check", "--config", PRODUCTION]);
    assert_eq!(out.code, Some(1));
    assert!(
        out.stderr.contains(&format!("{} problem(s)", vars.len())),
        "{}",
        out.stderr
    );

    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"model": "llama-3.3-70b", "messages": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    let request = request.to_str().unwrap();
    let out = without_secrets(&[
        "explain",
        "--config",
        PRODUCTION,
        "--request",
        request,
        "--key",
        "eu-support-bot",
    ]);
    assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
    let plan: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
    assert_eq!(plan["status"], 200, "{plan}");

    // An offline check still refuses everything but unset variables.
    let broken = broken_config();
    let mut cmd = tollgate();
    cmd.arg("check")
        .arg("--offline")
        .arg("--config")
        .arg(broken.path());
    assert_lists_every_problem(&run(cmd));
}

/// `explain --region EU` on a deployment whose licence is written
/// `"Llama"`: the EU rule applies.
#[test]
fn explain_applies_the_eu_rule_whatever_the_case() {
    let file = temp_config(RISKY);
    let dir = tempfile::tempdir().unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(
        &request,
        r#"{"model": "vision", "messages": [{"role": "user", "content": "hi"}]}"#,
    )
    .unwrap();
    for region in ["eu", "EU"] {
        let mut cmd = tollgate();
        cmd.arg("explain")
            .arg("--config")
            .arg(file.path())
            .arg("--request")
            .arg(&request)
            .args(["--key", "anywhere", "--region", region]);
        let out = run(cmd);
        assert_eq!(out.code, Some(0), "stderr:\n{}", out.stderr);
        let plan: serde_json::Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(plan["status"], 451, "{region}: {plan}");
        assert_eq!(plan["chosen"], serde_json::Value::Null, "{region}: {plan}");
    }
}

/// A key or token short enough to guess is warned of by path, never
/// printed; `--strict` fails on it, and one of 16 characters passes.
#[test]
fn check_warns_of_a_key_or_token_short_enough_to_guess() {
    let file = temp_config(&format!(
        r#"
[admin]
token_env = "ADMIN_TOKEN"

[metrics]
token_env = "METRICS_TOKEN"
{SIMULATED}
[[keys]]
name = "short"
key_env = "KEY_SHORT"
models = ["*"]

[[keys]]
name = "long"
key_env = "KEY_LONG"
models = ["*"]
"#
    ));
    let check = |strict: bool| {
        let mut cmd = tollgate();
        cmd.arg("check").arg("--config").arg(file.path());
        if strict {
            cmd.arg("--strict");
        }
        cmd.env("ADMIN_TOKEN", "adm")
            .env("METRICS_TOKEN", "0123456789abcdef")
            .env("KEY_SHORT", "team-secret")
            .env("KEY_LONG", "7f3a9c1e5b2d8f4a6c0e9b1d3f5a7c2e");
        run(cmd)
    };
    let out = check(false);
    assert_eq!(out.code, Some(0), "warnings do not fail:\n{}", out.stderr);
    let warnings: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("warning: "))
        .collect();
    assert_eq!(warnings.len(), 2, "{}", out.stderr);
    for path in ["admin.token_env", "keys[0].key_env"] {
        assert!(
            warnings
                .iter()
                .any(|w| w.starts_with(&format!("warning: {path}: "))
                    && w.contains("shorter than 16 characters")),
            "{path}: {}",
            out.stderr
        );
    }
    for secret in ["adm", "team-secret"] {
        assert!(
            !out.stderr.contains(&format!("\"{secret}\""))
                && !out.stderr.contains(&format!(" {secret} ")),
            "the secret is never printed: {}",
            out.stderr
        );
    }
    let strict = check(true);
    assert_eq!(strict.code, Some(1), "--strict fails on warnings");
}

/// `SIMULATED` with the admin API and a key.
fn administered() -> String {
    format!(
        "[admin]\ntoken_env = \"TOLLGATE_TEST_ADMIN_TOKEN\"\n{SIMULATED}\n\
         [[keys]]\nname = \"team\"\n\
         sha256 = \"5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b\"\n\
         models = [\"*\"]\n"
    )
}

const ADMIN_TOKEN: &str = "admin-token-for-the-hostile-name-test";

/// The longest run of `x` in `text`: what it quotes of the huge name.
fn longest_x_run(text: &str) -> usize {
    text.split(|c| c != 'x')
        .map(str::len)
        .max()
        .unwrap_or_default()
}

#[tokio::test]
async fn a_huge_name_is_quoted_at_most_256_characters_by_check_a_reload_and_its_log() {
    // A 100 KB name as an unknown key, a key's name, the backend a
    // deployment names and the alias a key names: each problem quoting it
    // quotes 256 characters of it, in `check`, the 422 of a reload (its
    // message and its problems) and the log of a refused file reload.
    let huge = "x".repeat(100_000);
    let hostile = format!(
        "[server]\n\"{huge}\" = 1\n{}\n\
         [[models]]\nalias = \"other\"\n[[models.deployments]]\nbackend = \"{huge}\"\n\
         model = \"m\"\ncontext_window = 8192\n\n\
         [[keys]]\nname = \"{huge}\"\n\
         sha256 = \"5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b\"\n\
         models = [\"{huge}\"]\n",
        administered()
    );
    let quoted = |what: &str, text: &str| {
        assert!(
            (1..=256).contains(&longest_x_run(text)) && text.contains('…'),
            "{what} quotes {} characters of the name ({} bytes in all)",
            longest_x_run(text),
            text.len()
        );
    };

    let file = temp_config(&hostile);
    let mut check = tollgate();
    check.arg("check").arg("--config").arg(file.path());
    let out = run(check);
    assert_eq!(
        out.code,
        Some(1),
        "{}",
        &out.stderr[..out.stderr.len().min(2000)]
    );
    for said in [
        "models[1].deployments[0].backend: no backend named \"xxx",
        "keys[1].name: must be 1 to 128 characters long",
        "keys[1].models[0]: no model with alias \"xxx",
        "server.xxx",
    ] {
        assert!(
            out.stderr.contains(said),
            "{said}: {}",
            &out.stderr[..out.stderr.len().min(4000)]
        );
    }
    quoted("check", &out.stderr);

    let file = temp_config(&administered());
    let gateway =
        support::process::serve_file(file.path(), &[("TOLLGATE_TEST_ADMIN_TOKEN", ADMIN_TOKEN)]);
    let response = reqwest::Client::new()
        .post(format!("{}/admin/reload", gateway.base))
        .bearer_auth(ADMIN_TOKEN)
        .body(hostile.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
    let body: serde_json::Value = response.json().await.unwrap();
    let problems = body["problems"].as_array().unwrap();
    assert!(problems.len() >= 4, "{}", problems.len());
    quoted("a reload's problems", &body["problems"].to_string());
    quoted(
        "a reload's message",
        body["error"]["message"].as_str().unwrap(),
    );

    std::fs::write(file.path(), &hostile).unwrap();
    let log = gateway.lines_once("config reload refused", problems.len());
    quoted(
        "the log",
        &log.iter()
            .filter(|l| l.contains("config reload refused"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n"),
    );
}
