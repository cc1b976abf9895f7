//! Configuration: the TOML schema, loading, and validation that reports
//! every problem with the path of the value at fault.

mod diff;
mod exposure;
mod location;
pub mod postgres_url;
mod schema;
mod secret_query;
mod types;
mod validate;
mod warnings;
mod written;

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::logging::echo_words;

pub use diff::{Changes, ConfigDiff, diff};
pub use exposure::open_to_network;
pub use location::{Location, locate};
pub use types::*;
pub use validate::{DEFAULT_LISTEN, EnvLookup, NONE, Secrets};
pub use written::WrittenKeys;

/// One thing wrong with a config file, at a path such as
/// `models[1].deployments[0].backend`, and where the file writes it. As
/// JSON: `{path, message}`, with `line` and `column` when placed. Both
/// quote names from the file, so both are shown, as text and as JSON,
/// with each word cut at 256 characters ([`echo_words`]): a huge name is
/// never echoed whole into a reload's 422, a log line or `check`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    #[serde(serialize_with = "echoed")]
    pub path: String,
    #[serde(serialize_with = "echoed")]
    pub message: String,
    /// `None` until [`locate`]d, and after when the file does not write
    /// the path (its value is a default).
    #[serde(flatten)]
    pub at: Option<Location>,
}

impl Problem {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
            at: None,
        }
    }
}

/// `path: message (line L, column C)`: the location last, where a value
/// of the wrong type always had it, so `path: message` still starts the
/// line.
impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", echo_words(&self.path))?;
        }
        f.write_str(&echo_words(&self.message))?;
        match self.at {
            Some(at) => write!(f, " ({at})"),
            None => Ok(()),
        }
    }
}

fn echoed<S: serde::Serializer>(text: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&echo_words(text))
}

/// Every problem found in one config; never empty.
#[derive(Debug, Clone)]
pub struct Problems(pub Vec<Problem>);

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

impl Problems {
    fn one(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self(vec![Problem::new(path, message)])
    }
}

/// Reads and validates a config file.
pub fn load(path: &Path, secrets: Secrets<'_>) -> Result<Config, Problems> {
    parse_with(&read(path)?, secrets)
}

/// Reads a config file's text, refusing an empty one.
pub fn read(path: &Path) -> Result<String, Problems> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        Problems::one(
            "",
            format!("cannot read config file {}: {e}", path.display()),
        )
    })?;
    // As a reload refuses it: a truncated file would serve nothing, and
    // `check` before a restart must not pass it.
    if text.trim().is_empty() {
        return Err(Problems::one(
            "",
            format!(
                "config file {} is empty, as a truncated file is; write the config (config/tollgate.toml is a start)",
                path.display()
            ),
        ));
    }
    Ok(text)
}

/// Parses and validates config text, reading its secrets with `env`.
pub fn parse(text: &str, env: EnvLookup<'_>) -> Result<Config, Problems> {
    parse_with(text, Secrets::Read(env))
}

/// Parses and validates config text. Unknown keys are all reported along
/// with the semantic problems; a value of the wrong type stops parsing, so
/// it is reported with the unknown keys read before it only. Problems and
/// warnings come located in `text`.
pub fn parse_with(text: &str, secrets: Secrets<'_>) -> Result<Config, Problems> {
    let parsed = toml::de::DeTable::parse(text).map_err(|e| {
        Problems(vec![Problem {
            at: error_at(text, &e),
            ..Problem::new("", format!("TOML syntax error: {}", e.message()))
        }])
    })?;
    // The parsed document serves twice, read into the schema and kept as
    // JSON: a config of 100,000 keys is not parsed a second time. The keys
    // stay out of the copy ([`WrittenKeys`] keeps them as parsed).
    let copy = without_keys(&parsed);
    let mut unknown = Vec::new();
    let read: Result<schema::RawConfig, _> =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
            toml::Deserializer::from(parsed),
            &mut |path: serde_ignored::Path<'_>| unknown.push(dotted(&path)),
        ));
    let mut problems: Vec<Problem> = unknown
        .into_iter()
        .map(|path| {
            Problem::new(
                path,
                "unknown key; check its spelling against docs/configuration.md",
            )
        })
        .collect();
    // The unknown keys read before it are named too: a misspelt required
    // field is read as unknown, then missed.
    let raw = match read {
        Ok(raw) => raw,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            // Where the value of the wrong type is: the toml crate knows.
            problems.push(Problem {
                at: error_at(text, &inner),
                ..Problem::new(
                    if path == "." { String::new() } else { path },
                    inner.message(),
                )
            });
            place(text, &copy, &mut problems);
            return Err(Problems(problems));
        }
    };
    match validate::validate(raw, secrets) {
        Ok(mut config) if problems.is_empty() => {
            config.version = version(text);
            place(text, &copy, &mut config.warnings);
            config.document = document(copy);
            Ok(config)
        }
        result => {
            if let Err(Problems(more)) = result {
                problems.extend(more);
            }
            place(text, &copy, &mut problems);
            Err(Problems(problems))
        }
    }
}

/// Places `problems` in `text`, whose parse, but for its keys, is `copy`:
/// a problem in `[[keys]]` has only its key's table parsed again, and the
/// whole text only when that does not place it, so a config of 100,000
/// keys with a problem in one costs no second parse.
fn place(text: &str, copy: &toml::Spanned<toml::de::DeTable<'_>>, problems: &mut [Problem]) {
    location::place(text, copy.get_ref(), problems);
    if location::place_in_keys(text, problems) {
        locate(text, problems);
    }
}

/// A config's version: the first 16 hex digits of the sha256 of its text.
pub fn version(text: &str) -> String {
    use sha2::Digest;
    hex::encode(&sha2::Sha256::digest(text.as_bytes())[..8])
}

/// The parsed document without its `[[keys]]`.
fn without_keys<'i>(
    parsed: &toml::Spanned<toml::de::DeTable<'i>>,
) -> toml::Spanned<toml::de::DeTable<'i>> {
    let tables = parsed
        .get_ref()
        .iter()
        .filter(|(name, _)| name.get_ref() != "keys")
        .map(|(name, table)| (name.clone(), table.clone()))
        .collect();
    toml::Spanned::new(parsed.span(), tables)
}

/// The config file as JSON. Secrets never sit in the file, only the names
/// of the variables holding them.
fn document(parsed: toml::Spanned<toml::de::DeTable<'_>>) -> serde_json::Value {
    use serde::Deserialize;
    serde_json::Value::deserialize(toml::Deserializer::from(parsed)).unwrap_or_default()
}

/// Where the toml crate found an error.
fn error_at(text: &str, e: &toml::de::Error) -> Option<Location> {
    e.span().map(|s| location::Lines::new(text).at(s.start))
}

/// `models[1].deployments[0].foo`, the same notation validation uses.
fn dotted(path: &serde_ignored::Path<'_>) -> String {
    use serde_ignored::Path as P;
    match path {
        P::Root => String::new(),
        P::Seq { parent, index } => format!("{}[{index}]", dotted(parent)),
        P::Map { parent, key } => {
            let parent = dotted(parent);
            if parent.is_empty() {
                key.clone()
            } else {
                format!("{parent}.{key}")
            }
        }
        P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            dotted(parent)
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use sha2::Digest;
    use std::time::Duration;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str) -> Vec<String> {
        match parse(text, &no_env) {
            Ok(_) => Vec::new(),
            Err(p) => said(&p),
        }
    }

    /// What each problem says, without where: these tests are of the
    /// messages (`location` is of the places).
    fn said(problems: &Problems) -> Vec<String> {
        let unplaced = |p: &Problem| {
            Problem {
                at: None,
                ..p.clone()
            }
            .to_string()
        };
        problems.0.iter().map(unplaced).collect()
    }

    /// One simulated backend and one model `m` on it, ending inside the
    /// deployment's table.
    pub(crate) const MINIMAL: &str = r#"
[[backends]]
name = "sim"
kind = "simulated"

[[models]]
alias = "m"
[[models.deployments]]
backend = "sim"
model = "llama"
context_window = 8192
"#;

    #[test]
    fn cors_origins_are_origins_or_a_star() {
        let with =
            |origins: &str| problems(&format!("[server]\ncors_origins = {origins}\n{MINIMAL}"));
        assert!(with(r#"["https://app.example.com", "http://localhost:3000", "*"]"#).is_empty());
        let bad = with(r#"["app.example.com", "https://app.example.com/chat", "ftp://x.org"]"#);
        assert_eq!(bad.len(), 3, "{bad:?}");
        assert!(
            bad[0].starts_with("server.cors_origins[0]: \"app.example.com\" is not an origin"),
            "{bad:?}"
        );
    }

    #[test]
    fn the_keepalive_timeout_outlasts_load_balancers_unless_set_and_is_bounded() {
        let keepalive = |server: &str| {
            parse(&format!("[server]\n{server}\n{MINIMAL}"), &no_env)
                .map(|config| config.server.keepalive_timeout)
                .map_err(|p| said(&p))
        };
        assert_eq!(keepalive(""), Ok(Duration::from_secs(620)));
        assert_eq!(
            keepalive("keepalive_timeout_ms = 75000"),
            Ok(Duration::from_secs(75))
        );
        for wrong in ["0", "86400001"] {
            let problems = keepalive(&format!("keepalive_timeout_ms = {wrong}")).unwrap_err();
            assert_eq!(
                problems,
                ["server.keepalive_timeout_ms: must be from 1 to 86400000 (one day)"],
                "{wrong}"
            );
        }
    }

    #[test]
    fn a_backends_ca_file_is_for_https_and_must_hold_a_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        crate::tls::write_test_ca(&ca);
        let with = |base_url: &str, file: &std::path::Path| {
            let text = format!(
                "[[backends]]\nname = \"gpu\"\nkind = \"vllm\"\nbase_url = \"{base_url}\"\nca_file = \"{}\"\n{MINIMAL}",
                file.display()
            );
            let config = parse(&text, &no_env);
            let roots = config.as_ref().map(|c| c.backends[0].tls.roots.clone());
            roots.map_err(said)
        };
        let roots = with("https://gpu.internal/v1", &ca).unwrap();
        assert!(matches!(roots, Roots::File(file) if file.path == ca));
        assert_eq!(
            with("http://gpu.internal/v1", &ca).unwrap_err(),
            [
                "backends[0].ca_file: applies only to a backend reached over https://; use an https base_url, or remove it"
            ]
        );
        // A client certificate comes with its key.
        let text = format!(
            "[[backends]]\nname = \"gpu\"\nkind = \"vllm\"\nbase_url = \"https://gpu.internal/v1\"\ncert_file = \"{}\"\n{MINIMAL}",
            ca.display()
        );
        assert_eq!(
            problems(&text),
            [
                "backends[0].key_file: cert_file needs key_file, the certificate's private key in PEM"
            ]
        );
        let missing = with("https://gpu.internal/v1", &dir.path().join("gone.pem")).unwrap_err();
        assert!(
            missing.len() == 1
                && missing[0].starts_with("backends[0].ca_file: cannot read CA file"),
            "{missing:?}"
        );
    }

    #[test]
    fn shared_state_needs_a_redis_url_without_a_password_in_the_file() {
        let with = |state: &str| problems(&format!("[state]\n{state}\n{MINIMAL}"));
        assert!(
            with(
                r#"backend = "redis"
url = "redis://10.0.0.5:6379/0""#
            )
            .is_empty()
        );
        assert_eq!(
            with(
                r#"backend = "redis"
url = "redis://:hunter2@10.0.0.5:6379/0""#
            ),
            [
                "state.url: holds a password, and config files hold no secrets: put the URL in an environment variable and name it in url_env"
            ]
        );
        assert_eq!(
            with(
                r#"backend = "redis"
url = "redis://10.0.0.5:6379/0?password=hunter2""#
            ),
            [
                "state.url: the URL has a secret in its query (password=), which the Redis client does not send: write redis://:PASSWORD@HOST:PORT/DB, in an environment variable named by url_env"
            ]
        );
        assert_eq!(
            with(
                r#"backend = "redis"
url = "redis://10.0.0.5:6379/0?Token=hunter2""#
            ),
            [
                "state.url: the URL has a secret in its query (Token=), which the Redis client does not send: write redis://:PASSWORD@HOST:PORT/DB, in an environment variable named by url_env"
            ]
        );
        assert!(
            with(r#"backend = "redis""#)[0].starts_with("state.url_env: backend = \"redis\" needs"),
        );
        // TLS: the system's roots, or the CA a file holds; never unverified.
        assert!(
            with(
                r#"backend = "redis"
url = "rediss://h:6380/0""#
            )
            .is_empty()
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        crate::tls::write_test_ca(&ca);
        let with_ca = |url: &str, file: &std::path::Path| {
            with(&format!(
                "backend = \"redis\"\nurl = \"{url}\"\nca_file = \"{}\"",
                file.display()
            ))
        };
        assert!(with_ca("rediss://h:6380/0", &ca).is_empty());
        assert_eq!(
            with_ca("redis://h:6379/0", &ca),
            ["state.ca_file: applies only to a rediss:// URL (TLS); use rediss://, or remove it"]
        );
        let missing = with_ca("rediss://h:6380/0", &dir.path().join("missing.pem"));
        assert!(
            missing.len() == 1 && missing[0].starts_with("state.ca_file: cannot read CA file"),
            "{missing:?}"
        );
        assert_eq!(
            with(
                r#"backend = "redis"
url = "rediss://h:6380/0#insecure""#
            ),
            [
                "state.url: the URL has a #fragment, such as #insecure: the server's certificate is always verified; name its CA with ca_file instead"
            ]
        );
        assert_eq!(
            with(r#"url = "memcached://h:11211""#)[0],
            "state.url: applies only with backend = \"redis\"; set that, or remove this field"
        );
        assert!(
            with(
                r#"backend = "redis"
url = "memcached://h:11211""#
            )[0]
            .ends_with("must start with redis://, or rediss:// for TLS")
        );
        let bad = with(
            r#"backend = "redis"
url = "redis://h/0"
timeout_ms = 0
lease_ms = 10
on_unavailable = "wait"
prefix = "two words""#,
        );
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert_eq!(
            with(r#"backend = "etcd""#),
            [
                "state.backend: \"etcd\" is not a state backend; use \"memory\" (one process) or \"redis\" (shared by replicas)"
            ]
        );
        assert_eq!(
            with(r#"timeout_ms = 20"#),
            [
                "state.timeout_ms: applies only with backend = \"redis\"; set that, or remove this field"
            ]
        );
        // The URL may come from the environment, password and all; offline
        // it is not read.
        let text = format!("[state]\nbackend = \"redis\"\nurl_env = \"REDIS_URL\"\n{MINIMAL}");
        let env = |name: &str| (name == "REDIS_URL").then(|| "redis://:pw@h:6379/0".to_owned());
        let Ok(config) = parse(&text, &env) else {
            panic!("a URL from the environment may hold a password")
        };
        let StateSettings::Redis(redis) = config.state else {
            panic!("redis")
        };
        assert_eq!(redis.timeout, std::time::Duration::from_millis(50));
        assert_eq!(redis.lease, std::time::Duration::from_secs(30));
        assert_eq!(redis.on_unavailable, OnUnavailable::Local);
        assert_eq!(redis.prefix, "tollgate:");
        assert!(parse_with(&text, Secrets::Unread).is_ok());
        assert!(parse(&text, &no_env).is_err());
    }

    #[test]
    fn logs_are_text_or_json_and_traces_go_to_an_otlp_http_collector() {
        let with = |tables: &str| parse(&format!("{tables}\n{MINIMAL}"), &no_env);
        let config = with("").expect("valid");
        assert_eq!((config.logging, config.tracing), (LogFormat::Text, None));
        let config =
            with("[logging]\nformat = \"json\"\n[tracing]\notlp_endpoint = \"http://otel:4318\"")
                .expect("valid");
        assert_eq!(config.logging, LogFormat::Json);
        assert_eq!(
            config.tracing,
            Some(TracingSettings {
                traces_url: "http://otel:4318/v1/traces".into(),
                service_name: "tollgate".into(),
                sample_ratio: 1.0,
            })
        );
        let url = |endpoint: &str| {
            with(&format!("[tracing]\notlp_endpoint = \"{endpoint}\""))
                .expect("valid")
                .tracing
                .expect("on")
                .traces_url
        };
        assert_eq!(
            url("https://otel.example.com/otlp/"),
            "https://otel.example.com/otlp/v1/traces"
        );
        assert_eq!(
            url("http://otel:4318/v1/traces"),
            "http://otel:4318/v1/traces"
        );
        let problems = |tables: &str| problems(&format!("{tables}\n{MINIMAL}"));
        assert_eq!(
            problems("[logging]\nformat = \"logfmt\""),
            [
                "logging.format: \"logfmt\" is not a log format; use \"text\" (the default) or \"json\" (one object per line)"
            ]
        );
        assert_eq!(
            problems("[tracing]\nsample_ratio = 0.5"),
            [
                "tracing.sample_ratio: applies only with otlp_endpoint, where spans are sent; set that, or remove this field"
            ]
        );
        for (endpoint, says) in [
            ("otel 4318", "is not a URL"),
            ("otel:4318", "http:// or https://"),
            ("grpc://otel:4317", "gRPC is not supported"),
            (
                "https://user:secret@otel.example.com",
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                "https://otel.example.com:4318?api_key=secret",
                "must not hold credentials (api_key= in its query); set them as headers in OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                "https://otel.example.com/v1/traces?x=1&ACCESS-TOKEN=secret",
                "(ACCESS-TOKEN= in its query)",
            ),
            (
                "https://otel.example.com?Signature=secret",
                "(Signature= in its query)",
            ),
        ] {
            let found = problems(&format!("[tracing]\notlp_endpoint = \"{endpoint}\""));
            assert!(
                found.len() == 1 && found[0].contains(says),
                "{endpoint}: {found:?}"
            );
            assert!(!found[0].contains("secret"), "{found:?}");
        }
        let bad = problems(
            "[tracing]\notlp_endpoint = \"http://otel:4318\"\nservice_name = \" \"\nsample_ratio = 1.5",
        );
        assert_eq!(bad.len(), 2, "{bad:?}");
    }

    #[test]
    fn deployments_list_the_endpoints_they_serve() {
        let with = |kind: &str, endpoints: &str| {
            problems(&format!(
                "[[backends]]\nname = \"b\"\nkind = \"{kind}\"\nbase_url = \"http://10.0.0.5:8000/v1\"\n\
                 [[models]]\nalias = \"e\"\n[[models.deployments]]\nbackend = \"b\"\nmodel = \"m\"\n\
                 context_window = 8192\nendpoints = {endpoints}\n"
            ))
        };
        for kind in ["vllm", "together", "openai"] {
            // Together and OpenAI also want an API key, not read here.
            let found = with(kind, r#"["embeddings"]"#);
            assert!(
                !found.iter().any(|p| p.contains("endpoints")),
                "{kind}: {found:?}"
            );
        }
        for kind in ["groq", "tgi"] {
            let found = with(kind, r#"["chat", "embeddings"]"#);
            let found: Vec<&String> = found.iter().filter(|p| p.contains("endpoints")).collect();
            assert_eq!(found.len(), 1, "{kind}: {found:?}");
            assert!(
                found[0].starts_with(&format!(
                    "models[0].deployments[0].endpoints: backend \"b\" is of kind {kind}, which serves no OpenAI-compatible embeddings"
                )),
                "{found:?}"
            );
        }
        assert_eq!(
            with("vllm", r#"["chat", "rerank", "chat"]"#),
            [
                "models[0].deployments[0].endpoints[1]: unknown endpoint \"rerank\"; expected one of: chat, completions, embeddings",
                "models[0].deployments[0].endpoints[2]: \"chat\" is listed twice",
            ]
        );
        assert_eq!(with("vllm", "[]").len(), 1);
        let config = parse(MINIMAL, &no_env).expect("valid");
        let served: Vec<&str> = config.models[0].deployments[0].endpoints.names().collect();
        assert_eq!(served, ["chat", "completions"]);
        for name in BackendKind::NAMES {
            assert_eq!(BackendKind::parse(name).map(BackendKind::name), Some(*name));
        }
    }

    #[test]
    fn minimal_config_is_valid_with_defaults() {
        let config = parse(MINIMAL, &no_env).expect("valid");
        assert_eq!(config.server.listen.to_string(), DEFAULT_LISTEN);
        let d = &config.models[0].deployments[0];
        assert_eq!(d.name, "m/sim");
        assert!(d.modalities.text && !d.modalities.image);
    }

    #[test]
    fn response_caps_default_and_are_checked() {
        let backend = |fields: &str| {
            MINIMAL.replace(
                "kind = \"simulated\"",
                &format!("kind = \"simulated\"\n{fields}"),
            )
        };
        let config = parse(MINIMAL, &no_env).expect("valid");
        let sim = &config.backends[0];
        assert_eq!(
            (sim.max_response_bytes, sim.max_event_bytes),
            (64 << 20, 4 << 20)
        );
        // A small body cap lowers the default event cap with it.
        let config = parse(&backend("max_response_bytes = 4096"), &no_env).expect("valid");
        let sim = &config.backends[0];
        assert_eq!((sim.max_response_bytes, sim.max_event_bytes), (4096, 4096));
        assert_eq!(
            problems(&backend("max_response_bytes = 100\nmax_event_bytes = 8192")),
            [
                "backends[0].max_response_bytes: must be between 1024 and 4294967296 (4 GiB)",
                "backends[0].max_event_bytes: must be between 1024 and the backend's max_response_bytes (100)",
            ]
        );
        assert_eq!(
            problems(&backend(
                "max_response_bytes = 4096\nmax_event_bytes = 8192"
            )),
            [
                "backends[0].max_event_bytes: must be between 1024 and the backend's max_response_bytes (4096)"
            ]
        );
    }

    #[test]
    fn reports_every_problem_with_its_path() {
        let text = r#"
[server]
listn = "0.0.0.0:1"

[[backends]]
name = "v"
kind = "vllm"

[[backends]]
name = "v"
kind = "nope"

[[models]]
alias = "a"
[[models.deployments]]
backend = "sim"
model = "x"
context_window = 1
modalities = ["text", "smell"]
colour = "red"

[[models]]
alias = "b"
[[models.deployments]]
backend = "vllm-eu"
model = "x"
context_window = 1

[[keys]]
name = "k"
models = ["zzz"]
"#;
        let got = problems(text);
        let expected = [
            "server.listn: unknown key",
            "models[0].deployments[0].colour: unknown key",
            "backends[0].base_url: a vllm backend needs base_url",
            "backends[1].kind: unknown kind \"nope\"",
            "backends[1].name: \"v\" is defined twice",
            "models[0].deployments[0].backend: no backend named \"sim\"",
            "models[0].deployments[0].modalities[1]: unknown modality \"smell\"",
            "models[1].deployments[0].backend: no backend named \"vllm-eu\"",
            "keys[0]: needs sha256",
            "keys[0].models[0]: no model with alias \"zzz\"",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn a_wrong_type_names_its_path_and_line() {
        let Err(got) = parse("[[backends]]\nname = \"a\"\nkind = 5\n", &no_env) else {
            panic!("a wrong type is refused");
        };
        let got: Vec<String> = got.0.iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("backends[0].kind: invalid type"),
            "{got:?}"
        );
        assert!(got[0].contains("line 3"), "{got:?}");
    }

    #[test]
    fn problems_and_warnings_are_placed_where_the_text_writes_their_path() {
        let text = format!(
            "[server]\nmax_body_bytes = 10\n{MINIMAL}\n[[backends]]\nname = \"b\"\nkind = \"bedrock\"\n"
        );
        let Err(refused) = parse(&text, &no_env) else {
            panic!("invalid");
        };
        let placed: Vec<(&str, Option<(usize, bool)>)> = refused
            .0
            .iter()
            .map(|p| (p.path.as_str(), p.at.map(|at| (at.line, at.written))))
            .collect();
        let header = text
            .lines()
            .position(|l| l == "kind = \"bedrock\"")
            .unwrap()
            - 1;
        assert_eq!(
            placed,
            [
                ("server.max_body_bytes", Some((2, true))),
                // Not written: placed under the table it is missing from.
                ("backends[1].aws_region", Some((header, false))),
                ("backends[1]", Some((header, true))),
            ]
        );
        assert!(
            refused.0[0].to_string().ends_with(" (line 2, column 1)"),
            "{refused}"
        );
        let text = MINIMAL.replace("model = \"llama\"", "model = \"meta-llama/Llama-3.3-70B\"");
        let warnings = parse(&text, &no_env).expect("valid").warnings;
        let line = text.lines().position(|l| l.contains("Llama-3.3")).unwrap() + 1;
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].path, "models[0].deployments[0].licence");
        let deployment = text
            .lines()
            .position(|l| l == "[[models.deployments]]")
            .unwrap()
            + 1;
        let under = warnings[0].at.map(|at| (at.line, at.written));
        assert_eq!(under, Some((deployment, false)), "licence is not written");
        let text = text.replace("context_window", "licence = \"qwen\"\ncontext_window");
        let warnings = parse(&text, &no_env).expect("valid").warnings;
        assert_eq!(warnings[0].at.map(|at| at.line), Some(line + 1));
    }

    #[test]
    fn a_base_url_with_credentials_is_refused_without_echoing_them() {
        let got = problems(
            r#"
[[backends]]
name = "v"
kind = "vllm"
base_url = "http://user:hunter2-secret@vllm:8000/v1"
"#,
        );
        assert_eq!(
            got,
            [
                "backends[0].base_url: must not hold credentials (user:password@); a backend's API key goes in api_key_env"
            ]
        );
        // Azure's style, and a key in an engine's metrics URL.
        let got = problems(
            r#"
[[backends]]
name = "v"
kind = "vllm"
base_url = "https://a.openai.azure.com/openai/v1?api-version=1&api-key=hunter2-secret"
engine_metrics = { url = "http://vllm:8000/metrics?token=hunter2-secret" }
"#,
        );
        assert_eq!(
            got,
            [
                "backends[0].base_url: must not hold credentials (api-key= in its query); a backend's API key goes in api_key_env",
                "backends[0].engine_metrics.url: must not hold credentials (token= in its query); a backend's API key goes in api_key_env"
            ]
        );
    }

    #[test]
    fn a_misspelt_required_field_is_named_beside_the_one_missing() {
        let got = problems("[[backends]]\nname = \"sim\"\nkinde = \"simulated\"\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(
            got[0].starts_with("backends[0].kinde: unknown key"),
            "{got:?}"
        );
        assert!(got[1].contains("missing field `kind`"), "{got:?}");
    }

    #[test]
    fn missing_secrets_are_reported_by_variable_name() {
        let text = r#"
[[backends]]
name = "t"
kind = "together"
api_key_env = "TOGETHER_KEY_FOR_TEST"
"#;
        let got = problems(text);
        assert_eq!(
            got,
            [
                "backends[0].api_key_env: environment variable TOGETHER_KEY_FOR_TEST is not set (or is empty)"
            ]
        );
        let env = |name: &str| (name == "TOGETHER_KEY_FOR_TEST").then(|| "secret".to_string());
        let config = parse(text, &env).expect("valid once set");
        assert_eq!(
            config.backends[0].base_url.as_ref().unwrap().as_str(),
            "https://api.together.xyz/v1"
        );
        assert!(
            !format!("{config:?}").contains("secret\""),
            "secrets never show in Debug"
        );
    }

    #[test]
    fn prices_become_exact_micro_dollars() {
        let text = MINIMAL.replace(
            "context_window",
            "input_usd_per_mtok = 0.88\noutput_usd_per_mtok = 0.2\ncontext_window",
        );
        let config = parse(&text, &no_env).expect("valid");
        let price = config.models[0].deployments[0].price;
        assert_eq!(price.input_micro_usd_per_mtok, 880_000);
        assert_eq!(price.output_micro_usd_per_mtok, 200_000);
    }

    #[test]
    fn any_modality_beside_text_requires_multimodal_flag() {
        for medium in ["image", "audio", "video"] {
            let text = MINIMAL.replace(
                "context_window",
                &format!("modalities = [\"text\", \"{medium}\"]\ncontext_window"),
            );
            assert_eq!(
                problems(&text),
                [
                    "models[0].deployments[0].multimodal: this deployment accepts images, audio or video, so its model is multimodal; set multimodal = true"
                ],
                "{medium}"
            );
            let flagged = text.replace("context_window", "multimodal = true\ncontext_window");
            let config = parse(&flagged, &no_env).expect("valid");
            let m = config.models[0].deployments[0].modalities;
            assert_eq!(
                [m.text, m.image, m.audio, m.video],
                [
                    true,
                    medium == "image",
                    medium == "audio",
                    medium == "video"
                ]
            );
        }
    }

    #[test]
    fn a_client_key_that_is_the_admin_or_metrics_token_is_refused() {
        let text = format!(
            "[admin]\ntoken_env = \"ADMIN\"\n[metrics]\ntoken_env = \"SCRAPER\"\n{MINIMAL}\n\
             [[keys]]\nname = \"app\"\nkey_env = \"APP\"\nmodels = [\"*\"]\n\
             [[keys]]\nname = \"other\"\nkey_env = \"OTHER\"\nmodels = [\"*\"]\n"
        );
        let env = |name: &str| {
            let secret = match name {
                "ADMIN" | "APP" => "the-same-secret-0123456789",
                "SCRAPER" | "OTHER" => "another-secret-0123456789",
                _ => return None,
            };
            Some(secret.to_owned())
        };
        let got: Vec<String> = match parse(&text, &env) {
            Ok(_) => Vec::new(),
            Err(p) => said(&p),
        };
        assert_eq!(
            got,
            [
                "keys[0]: key \"app\" has the same secret as [admin] token_env; a client key must not be a token",
                "keys[1]: key \"other\" has the same secret as [metrics] token_env; a client key must not be a token",
            ]
        );
    }

    #[test]
    fn duplicate_key_secrets_name_the_right_entries() {
        let digest = "a".repeat(64);
        let text = format!(
            "{MINIMAL}\n[[keys]]\nname = \"bad\"\nsha256 = \"zz\"\nmodels = [\"m\"]\n\
             [[keys]]\nname = \"one\"\nsha256 = \"{digest}\"\nmodels = [\"*\", \"nope\"]\n\
             [[keys]]\nname = \"two\"\nsha256 = \"{digest}\"\nmodels = [\"m\"]\nregion = \"\"\n"
        );
        let got = problems(&text);
        for expected in [
            "keys[0].sha256: must be 64 hex digits",
            "keys[1].models[1]: no model with alias \"nope\"",
            "keys[2]: key \"two\" has the same secret as keys[1]",
            "keys[2].region: must not be empty",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(expected)),
                "missing {expected:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), 4, "{got:#?}");
    }

    #[test]
    fn secrets_are_trimmed_and_must_be_printable() {
        let text = MINIMAL.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\n\n[[keys]]\nname = \"k\"\nkey_env = \"K\"\nmodels = [\"*\"]",
        );
        let trailing_newline = |_: &str| Some("sk-123\n".to_string());
        let config = parse(&text, &trailing_newline).expect("a trailing newline is trimmed");
        let expected: [u8; 32] = sha2::Sha256::digest(b"sk-123").into();
        assert_eq!(config.keys[0].sha256, expected);
        let control = |_: &str| Some("sk\x01x".to_string());
        assert!(parse(&text, &control).is_err());
    }

    const BEDROCK: &str = r#"
[[backends]]
name = "bedrock-us"
kind = "bedrock"
aws_region = "us-east-1"
aws_access_key_id_env = "AWS_ID"
aws_secret_access_key_env = "AWS_SECRET"
aws_session_token_env = "AWS_TOKEN"
drop_params = ["seed", "logprobs"]

[[backends]]
name = "bedrock-eu"
kind = "bedrock"
aws_region = "eu-central-1"
api_key_env = "BEDROCK_KEY"

[[backends]]
name = "tgi"
kind = "tgi"
base_url = "http://10.0.0.5:8080"
"#;

    fn aws_env(name: &str) -> Option<String> {
        Some(format!("value-of-{name}"))
    }

    #[test]
    fn bedrock_takes_sigv4_keys_or_an_api_key_and_defaults_its_base_url() {
        let config = parse(BEDROCK, &aws_env).expect("valid");
        let [us, eu, tgi] = &config.backends[..] else {
            panic!("three backends");
        };
        assert_eq!(us.kind, BackendKind::Bedrock);
        assert_eq!(
            us.base_url.as_ref().unwrap().as_str(),
            "https://bedrock-runtime.us-east-1.amazonaws.com/"
        );
        let aws = us.aws.as_ref().unwrap();
        assert_eq!(aws.region, "us-east-1");
        assert_eq!(aws.drop_params, ["seed", "logprobs"]);
        let keys = aws.keys.as_ref().unwrap();
        assert_eq!(keys.secret_access_key.expose(), "value-of-AWS_SECRET");
        assert_eq!(
            keys.session_token.as_ref().unwrap().expose(),
            "value-of-AWS_TOKEN"
        );
        assert!(
            !format!("{us:?}").contains("value-of"),
            "no secret in Debug"
        );
        assert!(eu.aws.as_ref().unwrap().keys.is_none());
        assert_eq!(
            eu.credential.as_ref().unwrap().expose(),
            "value-of-BEDROCK_KEY"
        );
        assert_eq!(tgi.kind, BackendKind::Tgi);
        assert!(tgi.aws.is_none());
    }

    #[test]
    fn bedrock_and_tgi_rules_are_reported_with_their_paths() {
        let text = r#"
[[backends]]
name = "no-region-no-credentials"
kind = "bedrock"

[[backends]]
name = "both"
kind = "bedrock"
aws_region = "us-east-1"
api_key_env = "K"
aws_access_key_id_env = "ID"
aws_secret_access_key_env = "SECRET"

[[backends]]
name = "half"
kind = "bedrock"
aws_region = "US East"
aws_secret_access_key_env = "SECRET"

[[backends]]
name = "token-with-key"
kind = "bedrock"
aws_region = "eu-west-1"
api_key_env = "K"
aws_session_token_env = "T"

[[backends]]
name = "vllm-with-aws"
kind = "vllm"
base_url = "http://10.0.0.5:8000/v1"
aws_region = "us-east-1"

[[backends]]
name = "tgi-v1"
kind = "tgi"
base_url = "http://10.0.0.5:8080/v1"

[[backends]]
name = "tgi-no-url"
kind = "tgi"

[[backends]]
name = "drop-misspelt"
kind = "bedrock"
aws_region = "us-east-1"
api_key_env = "K"
drop_params = ["seed", "sed"]

[[backends]]
name = "vllm-drops"
kind = "vllm"
base_url = "http://10.0.0.5:8000/v1"
drop_params = ["seed"]
"#;
        let got = match parse(text, &aws_env) {
            Ok(_) => Vec::new(),
            Err(p) => said(&p),
        };
        let expected = [
            "backends[0].aws_region: a bedrock backend needs aws_region",
            "backends[0]: a bedrock backend needs credentials",
            "backends[1]: give either api_key_env (a Bedrock API key) or aws_access_key_id_env",
            "backends[2].aws_region: \"US East\" is not an AWS region",
            "backends[2].aws_access_key_id_env: is needed with aws_secret_access_key_env",
            "backends[3].aws_session_token_env: a session token goes with",
            "backends[4].aws_region: only a bedrock backend takes aws_region",
            "backends[5].base_url: a tgi backend's base_url is the server's root",
            "backends[6].base_url: a tgi backend needs base_url, such as \"http://10.0.0.5:8080\"",
            "backends[7].drop_params[1]: \"sed\" is not a parameter Bedrock refuses; name one of: audio,",
            "backends[8].drop_params: only a bedrock backend takes drop_params; remove it",
        ];
        for e in expected {
            assert!(
                got.iter().any(|g| g.starts_with(e)),
                "missing {e:?} in {got:#?}"
            );
        }
        assert_eq!(got.len(), expected.len(), "{got:#?}");
    }

    #[test]
    fn rate_limits_of_keys_and_deployments() {
        let text = format!(
            "{MINIMAL}rpm = 600\ntpm = 100000\n\n[[keys]]\nname = \"web\"\nsha256 = \"{}\"\nmodels = [\"*\"]\nrpm = 2\n",
            "ab".repeat(32)
        );
        let config = parse(&text, &no_env).expect("valid");
        let d = &config.models[0].deployments[0];
        assert_eq!(d.limits.requests.map(|n| n.get()), Some(600));
        assert_eq!(d.limits.tokens.map(|n| n.get()), Some(100_000));
        let key = &config.keys[0];
        assert_eq!(key.limits.requests.map(|n| n.get()), Some(2));
        assert_eq!(key.limits.tokens, None, "no tpm, no token limit");

        let zeros = format!(
            "{MINIMAL}rpm = 0\n\n[[keys]]\nname = \"web\"\nsha256 = \"{}\"\nmodels = [\"*\"]\ntpm = 0\n",
            "ab".repeat(32)
        );
        assert_eq!(
            problems(&zeros),
            [
                "models[0].deployments[0].rpm: must be greater than 0; leave it out for no limit",
                "keys[0].tpm: must be greater than 0; leave it out for no limit",
            ]
        );
        let negative = format!("{MINIMAL}tpm = -5\n");
        let got = problems(&negative);
        assert!(
            got.len() == 1 && got[0].starts_with("models[0].deployments[0].tpm: invalid value"),
            "{got:?}"
        );
    }

    #[test]
    fn versions_and_diffs_name_what_changed() {
        let base = r#"
[[backends]]
name = "a"
kind = "simulated"
[[backends]]
name = "b"
kind = "simulated"
[[models]]
alias = "chat"
[[models.deployments]]
backend = "a"
model = "m"
context_window = 8192
[[keys]]
name = "team"
sha256 = "5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b"
models = ["*"]
"#;
        let old = parse(base, &no_env).unwrap();
        let new_text = base
            .replace("name = \"b\"", "name = \"c\"")
            .replace("model = \"m\"", "model = \"m2\"")
            .replace("5b5b5b5b", "6c6c6c6c")
            + "[routing]\nmax_attempts = 2\n[[models]]\nalias = \"new\"\nstrategy = \"latency\"\n[[models.deployments]]\nbackend = \"a\"\nmodel = \"m\"\ncontext_window = 1\n";
        let new = parse(&new_text, &no_env).unwrap();
        assert_eq!(old.version.len(), 16);
        assert_ne!(old.version, new.version);
        assert_eq!(
            parse(base, &no_env).unwrap().version,
            old.version,
            "a hash of the text"
        );
        let written = serde_json::to_value(old.written()).unwrap();
        assert_eq!(written["keys"][0]["name"], "team");
        assert!(
            !written.to_string().contains("5b5b5b5b"),
            "digests are redacted: {written}"
        );
        let d = diff(&old, &new);
        assert_eq!(d.backends.added, ["c"]);
        assert_eq!(d.backends.removed, ["b"]);
        assert!(d.backends.changed.is_empty());
        assert_eq!(d.models.added, ["new"]);
        assert_eq!(d.deployments.added, ["new/a"]);
        assert_eq!(d.deployments.changed, ["chat/a"]);
        assert_eq!(d.keys.changed, ["team"], "a new digest shows as a change");
        assert_eq!(d.settings, ["routing"]);
        assert!(diff(&old, &old).is_empty());
    }

    #[test]
    fn top_keys_defaults_to_100_and_is_bounded() {
        let config = parse(MINIMAL, &no_env).expect("valid");
        assert_eq!(config.metrics.top_keys, DEFAULT_TOP_KEYS);
        let with = |n: u32| format!("[metrics]\ntop_keys = {n}\n{MINIMAL}");
        assert_eq!(parse(&with(0), &no_env).expect("valid").metrics.top_keys, 0);
        assert_eq!(
            problems(&with(10_001)),
            [
                "metrics.top_keys: must be at most 10000; opt single keys in with keys[].metrics = true"
            ]
        );
    }

    #[test]
    fn licences_are_a_closed_set_matched_in_any_case() {
        let with = |licence: &str| {
            MINIMAL.replace(
                "context_window = 8192",
                &format!("context_window = 8192\nlicence = \"{licence}\""),
            )
        };
        for text in ["Llama", "LLAMA", "llama"] {
            let config = parse(&with(text), &no_env).expect("valid");
            assert!(config.models[0].deployments[0].is_llama(), "{text}");
        }
        assert_eq!(
            parse(&with("Apache-2.0"), &no_env).expect("valid").models[0].deployments[0].licence,
            Some(Licence::Apache2)
        );
        for text in ["meta-llama", "llama3.2", ""] {
            assert_eq!(
                problems(&with(text)),
                [format!(
                    "models[0].deployments[0].licence: unknown licence \"{text}\"; expected one of: \
                     llama, gemma, qwen, mistral, apache-2.0, mit, proprietary, other (any case), or leave it out"
                )]
            );
        }
    }

    #[test]
    fn regions_are_held_lowercase() {
        let text = MINIMAL.replace(
            "kind = \"simulated\"",
            "kind = \"simulated\"\nregion = \"EU-West-1\"",
        ) + "[[keys]]\nname = \"k\"\nsha256 = \"5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b5b\"\nmodels = [\"*\"]\nregion = \"EU\"\n\
               [policy]\neu_regions = [\"EU\", \"Eu-Other\"]\ndefault_region = \"US\"\n\
               [[policy.residency]]\nrequest_region = \"EU\"\nbackend_regions = [\"EU-West-1\"]\n\
               [[policy.residency]]\nrequest_region = \"eu\"\nbackend_regions = [\"eu-west-1\"]\n";
        assert_eq!(
            problems(&text),
            [
                "policy.residency[1].request_region: \"eu\" already has a residency rule; merge their backend_regions"
            ]
        );
        let text = text.replace("request_region = \"eu\"", "request_region = \"us\"");
        let config = parse(&text, &no_env).expect("valid");
        assert_eq!(config.backends[0].region.as_deref(), Some("eu-west-1"));
        assert_eq!(config.keys[0].region.as_deref(), Some("eu"));
        let policy = &config.policy;
        assert_eq!(policy.eu_regions, ["eu", "eu-other"]);
        assert_eq!(policy.default_region.as_deref(), Some("us"));
        assert!(policy.is_eu("eu"));
        assert_eq!(
            policy
                .residency_for("eu")
                .map(|r| r.backend_regions.clone()),
            Some(vec!["eu-west-1".to_owned()])
        );
    }

    #[test]
    fn offline_validation_checks_everything_but_whether_secrets_are_set() {
        let text = include_str!("../../config/examples/production.toml");
        let offline = parse_with(text, Secrets::Unread).expect("valid offline");
        assert!(offline.offline);
        assert!(
            offline
                .backends
                .iter()
                .all(|b| b.credential.is_none()
                    && b.aws.as_ref().is_none_or(|aws| aws.keys.is_none()))
        );
        assert!(
            offline.backends.iter().any(|b| b.aws.is_some()),
            "Bedrock keeps its region"
        );
        let missing = parse(text, &no_env).expect_err("secrets are required online");
        assert!(
            missing.0.iter().all(|p| p.message.contains("is not set")),
            "{missing}"
        );
        // A bad variable name and every other problem are still reported.
        let broken = text.replacen("key_env = \"TOLLGATE_KEY_WEB_APP\"", "key_env = \"A=B\"", 1);
        let Err(problems) = parse_with(&broken, Secrets::Unread) else {
            panic!("a bad variable name is refused offline");
        };
        assert_eq!(
            said(&problems),
            ["keys[0].key_env: \"A=B\" is not a valid environment variable name"]
        );
    }
}
