//! The container image, checked without building it (CI cannot pull its
//! base images): the `Dockerfile` runs the binary as the binary expects —
//! its port, config path, user, stop signal and health check — builds
//! with `deploy/release/build.sh`, whose cargo command is the one
//! `.ci/run` runs, and every config shipped under `deploy/` is valid.
//! `.ci/deploy-check` checks the Kubernetes and compose files against
//! this image.

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use support::config::{Backend, Config, Deployment, Model};
use support::gateway::start;
use tollgate::config::{DEFAULT_LISTEN, Secrets};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One instruction: its keyword, upper case, and the rest of its line.
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's stages, each a list of instructions, with continued
/// lines joined and comments dropped.
fn stages() -> Vec<Vec<Instruction>> {
    let text = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    for line in text.replace("\\\n", " ").lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (keyword, args) = line.split_once(' ').unwrap_or((line, ""));
        let keyword = keyword.to_uppercase();
        if keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(Instruction {
                keyword,
                args: args.trim().to_owned(),
            });
    }
    stages
}

/// The runtime image: the last stage.
struct Image(Vec<Instruction>);

impl Image {
    fn new() -> Self {
        Self(stages().pop().expect("a stage"))
    }

    /// The arguments of the one `keyword` instruction.
    fn one(&self, keyword: &str) -> &str {
        let found: Vec<&Instruction> = self.0.iter().filter(|i| i.keyword == keyword).collect();
        assert_eq!(found.len(), 1, "one {keyword} in the runtime stage");
        &found[0].args
    }

    /// An instruction in exec form, `["a", "b"]`, as its words.
    fn exec(&self, keyword: &str) -> Vec<String> {
        let args = self.one(keyword);
        let json = args.strip_prefix("CMD ").unwrap_or(args);
        let json = &json[json.find('[').expect("exec form")..];
        serde_json::from_str(json).unwrap_or_else(|e| panic!("{keyword} {args}: {e}"))
    }

    /// Where `COPY … SOURCE DEST` puts `source`.
    fn copied(&self, source: &str) -> String {
        self.0
            .iter()
            .filter(|i| i.keyword == "COPY")
            .find_map(|i| {
                let words: Vec<&str> = i.args.split_whitespace().collect();
                (words[words.len() - 2] == source).then(|| words[words.len() - 1].to_owned())
            })
            .unwrap_or_else(|| panic!("no COPY of {source}"))
    }
}

/// The value after `flag` in `words`.
fn flag<'a>(words: &'a [String], flag: &str) -> &'a str {
    let at = words.iter().position(|w| w == flag);
    &words[at.unwrap_or_else(|| panic!("no {flag} in {words:?}")) + 1]
}

#[test]
fn the_image_serves_its_config_on_its_port_as_a_user_and_stops_on_sigterm() {
    let image = Image::new();
    let entrypoint = image.exec("ENTRYPOINT");
    let cmd = image.exec("CMD");
    assert_eq!(
        entrypoint,
        [image.copied("/out/usr/local/bin/tollgate")],
        "ENTRYPOINT is the binary the build copied"
    );
    assert_eq!(cmd[0], "serve");

    // Port: the binary's default, on every interface in the container.
    let listen: SocketAddr = flag(&cmd, "--listen").parse().unwrap();
    let default: SocketAddr = DEFAULT_LISTEN.parse().unwrap();
    assert!(
        listen.ip().is_unspecified(),
        "{listen}: loopback is the container's own"
    );
    assert_eq!(listen.port(), default.port());
    assert_eq!(image.one("EXPOSE"), listen.port().to_string());

    // The config the image serves is the repo's default config, in the
    // directory a ConfigMap or bind mount replaces whole.
    let config_path = flag(&cmd, "--config");
    assert_eq!(config_path, image.copied("config/tollgate.toml"));
    assert_eq!(config_path, "/etc/tollgate/tollgate.toml");
    let config =
        tollgate::config::load(&repo("config/tollgate.toml"), Secrets::Unread).expect("valid");
    assert_eq!(config.server.listen.port(), listen.port());

    // Its ledger lands in the volume, from the working directory.
    let volume = Path::new(image.one("VOLUME"));
    let data_dir = Path::new(image.one("WORKDIR")).join(
        config
            .ledger
            .data_dir
            .expect("the default config keeps a ledger"),
    );
    assert!(
        data_dir.starts_with(volume),
        "{data_dir:?} is outside {volume:?}"
    );

    let user = image.one("USER");
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .expect("a numeric user");
    assert_ne!(uid, 0, "USER {user} is root");
    assert!(
        image.0.iter().any(|i| i.keyword == "COPY"
            && i.args.contains(&format!("--chown={user}"))
            && i.args.ends_with(&format!(" {}", volume.display()))),
        "the volume's directory belongs to {user}, so a fresh volume is writable"
    );
    // SIGTERM drains (SIGKILL or SIGQUIT would lose requests in flight).
    assert_eq!(image.one("STOPSIGNAL"), "SIGTERM");
}

#[test]
fn the_image_builds_with_the_release_script_whose_cargo_command_is_cis_in_release() {
    let build: Vec<Instruction> = stages().remove(0);
    let run = build
        .iter()
        .filter(|i| i.keyword == "RUN")
        .find(|i| i.args.contains("deploy/release/build.sh"))
        .expect("the build stage runs deploy/release/build.sh");
    let script = std::fs::read_to_string(repo("deploy/release/build.sh")).unwrap();
    let out = "target/release-bolt";
    assert!(
        script.contains(&format!("OUT_DIR=${{OUT_DIR:-$ROOT/{out}}}")),
        "the script writes to {out} by default"
    );
    assert!(
        run.args.contains(&format!(
            "install -D {out}/tollgate /out/usr/local/bin/tollgate"
        )),
        "the image installs what the script built"
    );
    let line = script
        .lines()
        .find(|l| l.contains("cargo build") && !l.trim_start().starts_with('#'))
        .expect("the script runs cargo build");
    let mut words = line[line.find("cargo build").unwrap()..]
        .split_whitespace()
        .map(|w| w.trim_end_matches(')'));
    // Release is what ships; CI builds debug for time; the script builds
    // the binary alone, into a target directory of its own. Nothing else
    // differs.
    let mut released = Vec::new();
    let mut release = false;
    while let Some(word) = words.next() {
        match word {
            "--release" => release = true,
            "--bin" | "--target-dir" => {
                words.next();
            }
            word => released.push(word),
        }
    }
    let ci = std::fs::read_to_string(repo(".ci/run")).unwrap();
    let ci: Vec<&str> = ci
        .lines()
        .find(|l| l.starts_with("cargo build"))
        .expect(".ci/run builds the binary")
        .split_whitespace()
        .collect();
    assert_eq!(released, ci, "the script runs {line:?}");
    assert!(release, "the script builds in release");
}

// The health check is a process of its own: block in place, so the
// gateway's runtime keeps serving on its other worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_health_check_passes_on_a_live_gateway_and_fails_without_one() {
    let image = Image::new();
    let check = image.exec("HEALTHCHECK");
    assert_eq!(check[0], image.exec("ENTRYPOINT")[0]);
    let serves: SocketAddr = flag(&image.exec("CMD"), "--listen").parse().unwrap();
    assert_eq!(flag(&check, "--listen"), serves.to_string());

    let gateway = start(
        &Config::new()
            .backend(Backend::simulated("sim"))
            .model(Model::new("m").deployment(Deployment::new("sim", "m"))),
    )
    .await;
    let port: u16 = gateway.base.rsplit(':').next().unwrap().parse().unwrap();
    // The image's health check, on this gateway's port instead.
    let run = |port: u16| {
        let mut args = check[1..].to_vec();
        let at = args.iter().position(|a| a == "--listen").unwrap() + 1;
        args[at] = SocketAddr::new(serves.ip(), port).to_string();
        Command::new(support::process::binary())
            .args(args)
            .output()
            .unwrap()
    };
    let ok = tokio::task::block_in_place(|| run(port));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    // A server that answers 503, then a port where nothing listens.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let unwell = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let (mut stream, _) = listener.accept().unwrap();
        let mut request = BufReader::new(stream.try_clone().unwrap());
        let mut line = String::new();
        while request.read_line(&mut line).unwrap() > 2 {
            line.clear();
        }
        let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n");
    });
    let failed = tokio::task::block_in_place(|| run(unwell));
    assert_eq!(failed.status.code(), Some(1));
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains(&format!("127.0.0.1:{unwell}/healthz: HTTP 503")),
        "{said}"
    );

    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let failed = tokio::task::block_in_place(|| run(closed));
    assert_eq!(failed.status.code(), Some(1));
    let said = String::from_utf8_lossy(&failed.stderr);
    assert!(
        said.contains(&format!("127.0.0.1:{closed}/healthz: ")),
        "{said}"
    );
}

#[test]
fn every_config_shipped_under_deploy_is_valid() {
    fn tomls(dir: &Path, found: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                tomls(&path, found);
            } else if path.extension().is_some_and(|e| e == "toml") {
                found.push(path);
            }
        }
    }
    let mut configs = Vec::new();
    tomls(&repo("deploy"), &mut configs);
    assert!(configs.len() >= 3, "{configs:?}");
    for path in configs {
        if let Err(problems) = tollgate::config::load(&path, Secrets::Unread) {
            panic!("{}:\n{problems}", path.display());
        }
    }
}
