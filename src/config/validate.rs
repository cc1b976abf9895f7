//! Semantic validation: turns a `RawConfig` into a `Config`, or reports
//! every problem it finds, each with the path of the value at fault.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use foldhash::{HashMap, HashSet};
use sha2::{Digest, Sha256};
use url::Url;

use super::schema::{RawBackend, RawConfig, RawDeployment, RawKey, RawModel, RawSimulated};
use super::secret_query::secret_in_query;
use super::types::*;
use super::warnings::{MIN_CREDENTIAL_CHARS, warnings};
use super::{Problem, Problems, WrittenKeys};
use crate::tls::CaFile;

/// The files of a client's TLS, as its table names them.
pub(super) struct TlsFiles<'a> {
    pub ca_file: Option<&'a str>,
    pub cert_file: Option<&'a str>,
    pub key_file: Option<&'a str>,
}

mod aws;
mod ledger;
mod licence;
mod limits;
mod metering;
mod routing;
mod state;
mod telemetry;

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
const DEFAULT_MAX_BODY_BYTES: u64 = 4 * 1024 * 1024;
const DEFAULT_SHUTDOWN_GRACE_MS: u64 = 30_000;
const DEFAULT_BODY_TIMEOUT_MS: u64 = 30_000;
/// nginx's `send_timeout`.
const DEFAULT_SEND_TIMEOUT_MS: u64 = 60_000;
/// Longer than the idle timeout of any load balancer commonly put in front
/// (AWS's ALB 60 s by default, Google Cloud's fixed 600 s), so that the
/// balancer closes an idle connection first: one it reuses just as the
/// gateway closes it fails the request it carries.
const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 620_000;
/// No keep-alive wait may exceed a day: a bigger number is a typo.
const MAX_KEEPALIVE_TIMEOUT_MS: u64 = 86_400_000;
const DEFAULT_CONNECT_MS: u64 = 5_000;
const DEFAULT_FIRST_BYTE_MS: u64 = 60_000;
const DEFAULT_IDLE_MS: u64 = 30_000;
const DEFAULT_MAX_RESPONSE_BYTES: u64 = 64 * 1024 * 1024;
const DEFAULT_MAX_EVENT_BYTES: u64 = 4 * 1024 * 1024;
/// No response cap the config sets may exceed 4 GiB: a bigger number is
/// a typo, and the cap exists to bound memory.
const MAX_RESPONSE_CAP: u64 = 4 * 1024 * 1024 * 1024;
/// No wait the config sets may exceed an hour: a bigger number is a typo.
pub(super) const MAX_WAIT_MS: u64 = 3_600_000;
/// The most prompt blocks (about 16 tokens each) a prefix cache or a
/// deployment's prefix memory may hold: 16 million tokens.
pub(super) const MAX_PREFIX_BLOCKS: u32 = 1_000_000;

/// Reads an environment variable; injected so tests need not touch the
/// process environment.
pub type EnvLookup<'a> = &'a dyn Fn(&str) -> Option<String>;

/// Whether validation reads the secrets a config names.
#[derive(Clone, Copy)]
pub enum Secrets<'a> {
    /// From the environment; a variable that is not set is a problem.
    Read(EnvLookup<'a>),
    /// Not at all, where they are not at hand (`check --offline`,
    /// `explain`): only the variables' names are checked. The config has
    /// no credentials and cannot serve (`Config::offline`).
    Unread,
}

pub fn validate(raw: RawConfig, secrets: Secrets<'_>) -> Result<Config, Problems> {
    let mut v = Validator {
        problems: Vec::new(),
        short_secrets: Vec::new(),
        secrets,
    };
    let server = v.server(&raw);
    let routing = v.routing(&raw);
    let policy = v.policy(&raw);
    let admin = v.admin(&raw);
    let metrics = v.metrics(&raw);
    let ledger = v.ledger(&raw);
    let state = v.state(&raw);
    let logging = v.logging(&raw);
    let tracing = v.tracing(&raw);
    let licence = v.licence(&raw);
    let backends: Vec<Backend> = raw
        .backends
        .iter()
        .enumerate()
        .filter_map(|(i, b)| v.backend(i, b))
        .collect();
    // What the gateway sends upstreams, an upstream can quote back: each
    // is redacted from what they send (client keys never go upstream).
    for backend in &backends {
        let keys = backend.aws.as_ref().and_then(|aws| aws.keys.as_ref());
        let sent = backend
            .credential
            .iter()
            .chain(keys.into_iter().flat_map(|k| {
                [&k.access_key_id, &k.secret_access_key]
                    .into_iter()
                    .chain(k.session_token.as_ref())
            }));
        for secret in sent {
            crate::redact::remember(secret.expose());
        }
    }
    v.unique(
        raw.backends
            .iter()
            .enumerate()
            .map(|(i, b)| (b.name.as_str(), move || format!("backends[{i}].name"))),
    );
    let self_hosted: HashMap<&str, bool> = raw
        .backends
        .iter()
        .map(|b| (b.name.as_str(), b.gpu_hour_usd.is_some()))
        .collect();
    let models: Vec<Model> = raw
        .models
        .iter()
        .enumerate()
        .map(|(i, m)| v.model(i, m, &self_hosted))
        .collect();
    v.unique(
        raw.models
            .iter()
            .enumerate()
            .map(|(i, m)| (m.alias.as_str(), move || format!("models[{i}].alias"))),
    );
    v.unique(models.iter().enumerate().flat_map(|(i, m)| {
        m.deployments.iter().enumerate().map(move |(j, d)| {
            (d.name.as_str(), move || {
                format!("models[{i}].deployments[{j}].name")
            })
        })
    }));
    v.embedding_backends(&models, &backends);
    let aliases: HashSet<&str> = raw.models.iter().map(|m| m.alias.as_str()).collect();
    let keys: Vec<(usize, Key)> = raw
        .keys
        .iter()
        .enumerate()
        .filter_map(|(i, k)| Some((i, v.key(i, k, &aliases)?)))
        .collect();
    v.unique(
        raw.keys
            .iter()
            .enumerate()
            .map(|(i, k)| (k.name.as_str(), move || format!("keys[{i}].name"))),
    );
    let mut hashes: HashMap<[u8; 32], usize> = HashMap::default();
    // Unread secrets have no digest to compare.
    let known = |i: &usize| matches!(secrets, Secrets::Read(_)) || raw.keys[*i].key_env.is_none();
    // A client key that is also a token would open the admin API, or
    // every key's series, to whoever holds it.
    let tokens = [
        (admin.token_sha256, "[admin] token_env"),
        (metrics.token_sha256, "[metrics] token_env"),
    ];
    for (i, key) in keys.iter().filter(|(i, _)| known(i)) {
        if let Some(first) = hashes.insert(key.sha256, *i) {
            v.problem(
                format!("keys[{i}]"),
                format!(
                    "key \"{}\" has the same secret as keys[{first}]; each key needs its own",
                    key.name
                ),
            );
        }
        for (_, token) in tokens.iter().filter(|(t, _)| *t == Some(key.sha256)) {
            v.problem(
                format!("keys[{i}]"),
                format!(
                    "key \"{}\" has the same secret as {token}; a client key must not be a token",
                    key.name
                ),
            );
        }
    }
    // Prometheus holds the metrics token, in its scrape config; the same
    // secret as the admin token would let it, or whoever reads that
    // config, reload this one.
    if admin.token_sha256.is_some() && admin.token_sha256 == metrics.token_sha256 {
        v.problem(
            "metrics.token_env",
            "the metrics token is the admin token; give /metrics a token of its own",
        );
    }

    if v.problems.is_empty() {
        let mut config = Config {
            offline: matches!(secrets, Secrets::Unread),
            version: String::new(),
            document: serde_json::Value::Null,
            server: server.expect("server is valid when there are no problems"),
            backends,
            models,
            keys: keys.into_iter().map(|(_, key)| key).collect(),
            written_keys: WrittenKeys::new(raw.keys),
            routing,
            policy,
            admin,
            metrics,
            ledger,
            state,
            logging,
            tracing,
            licence,
            warnings: Vec::new(),
        };
        config.warnings = warnings(&config, &v.short_secrets);
        Ok(config)
    } else {
        Err(Problems(v.problems))
    }
}

/// What metrics and logs write for "no alias", "no backend" or "no key"
/// (the request never got that far, or the gateway has no keys): no name
/// in the config may be it, or a refused request would read as that
/// name's.
pub const NONE: &str = "none";

struct Validator<'a> {
    problems: Vec<Problem>,
    /// Paths of the client credentials too short to be safe from guessing.
    short_secrets: Vec<String>,
    secrets: Secrets<'a>,
}

impl Validator<'_> {
    fn problem(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem::new(path, message));
    }

    /// Names are unique, and made of characters that are safe in metric
    /// labels, logs and the `x-tollgate-backend` header. Each name comes
    /// with its path, made only for a name at fault: a config of 100,000
    /// keys would make 100,000 of them otherwise.
    fn unique<'n, P: Fn() -> String>(&mut self, names: impl Iterator<Item = (&'n str, P)>) {
        let mut seen = HashSet::default();
        for (name, path) in names {
            if name.is_empty() || name.len() > 128 {
                self.problem(path(), "must be 1 to 128 characters long");
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:/".contains(&b))
            {
                self.problem(
                    path(),
                    format!("\"{name}\" may use only letters, digits and - _ . : /"),
                );
            } else if name == NONE {
                self.problem(
                    path(),
                    format!("\"{NONE}\" is what metrics and logs say when a request reached no alias, backend or key; choose another name"),
                );
            } else if !seen.insert(name) {
                self.problem(
                    path(),
                    format!("\"{name}\" is defined twice; names must be unique"),
                );
            }
        }
    }

    /// A secret named by an environment variable; reports a missing one.
    /// `None`, and no problem, when secrets are not read.
    fn secret(&mut self, path: String, var: &str) -> Option<Secret> {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            self.problem(
                path,
                format!("\"{var}\" is not a valid environment variable name"),
            );
            return None;
        }
        let Secrets::Read(env) = self.secrets else {
            return None;
        };
        // Env files often leave a trailing newline; a secret never ends in one.
        match env(var).as_deref().map(str::trim) {
            Some(value) if value.bytes().any(|b| !b.is_ascii_graphic()) => {
                self.problem(
                    path,
                    format!("environment variable {var} holds spaces or control characters; a credential cannot"),
                );
                None
            }
            Some(value) if !value.is_empty() => Some(Secret::new(value.to_owned())),
            _ => {
                self.problem(
                    path,
                    format!("environment variable {var} is not set (or is empty)"),
                );
                None
            }
        }
    }

    /// The digest of a credential clients present, held by environment
    /// variable `var`; one shorter than `MIN_CREDENTIAL_CHARS` is noted
    /// for `check` to warn of.
    fn credential(&mut self, path: String, var: &str) -> Option<[u8; 32]> {
        let secret = self.secret(path.clone(), var)?;
        if secret.expose().chars().count() < MIN_CREDENTIAL_CHARS {
            self.short_secrets.push(path);
        }
        Some(Sha256::digest(secret.expose().as_bytes()).into())
    }

    /// The URL of a service `[table]` connects to: written in the file
    /// (`url`) or named by an environment variable (`url_env`), one and
    /// not both; `missing` says what to set when neither is.
    /// `check(self, path, url, var)` reports what is wrong with it (`var`:
    /// the variable it came from). `None` when it is missing or wrong, or
    /// not read (offline).
    fn service_url(
        &mut self,
        table: &str,
        url: Option<&String>,
        url_env: Option<&String>,
        missing: &str,
        check: impl Fn(&mut Self, &str, &str, Option<&str>) -> bool,
    ) -> Option<Secret> {
        match (url, url_env) {
            (Some(_), Some(_)) => {
                self.problem(format!("{table}.url"), "set url or url_env, not both");
                None
            }
            (None, None) => {
                self.problem(format!("{table}.url_env"), missing);
                None
            }
            (Some(url), None) => {
                check(self, &format!("{table}.url"), url, None).then(|| Secret::new(url.clone()))
            }
            (None, Some(var)) => {
                let path = format!("{table}.url_env");
                let url = self.secret(path.clone(), var)?;
                check(self, &path, url.expose(), Some(var)).then_some(url)
            }
        }
    }

    fn server(&mut self, raw: &RawConfig) -> Option<ServerConfig> {
        let s = &raw.server;
        let listen_text = s.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen = match listen_text.parse::<SocketAddr>() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.problem(
                    "server.listen",
                    format!("\"{listen_text}\" is not an address; write IP:PORT, such as \"0.0.0.0:8080\""),
                );
                None
            }
        };
        let max_body_bytes = s.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            self.problem("server.max_body_bytes", "must be at least 1024");
        }
        let grace_ms = s.shutdown_grace_ms.unwrap_or(DEFAULT_SHUTDOWN_GRACE_MS);
        if grace_ms > MAX_WAIT_MS {
            self.problem(
                "server.shutdown_grace_ms",
                "must be at most 3600000 (one hour)",
            );
        }
        let grace = Duration::from_millis(grace_ms);
        let body_timeout_ms = s.body_timeout_ms.unwrap_or(DEFAULT_BODY_TIMEOUT_MS);
        if !(1..=MAX_WAIT_MS).contains(&body_timeout_ms) {
            self.problem(
                "server.body_timeout_ms",
                "must be from 1 to 3600000 (one hour)",
            );
        }
        let send_timeout_ms = s.send_timeout_ms.unwrap_or(DEFAULT_SEND_TIMEOUT_MS);
        if !(1..=MAX_WAIT_MS).contains(&send_timeout_ms) {
            self.problem(
                "server.send_timeout_ms",
                "must be from 1 to 3600000 (one hour)",
            );
        }
        let keepalive_ms = s
            .keepalive_timeout_ms
            .unwrap_or(DEFAULT_KEEPALIVE_TIMEOUT_MS);
        if !(1..=MAX_KEEPALIVE_TIMEOUT_MS).contains(&keepalive_ms) {
            self.problem(
                "server.keepalive_timeout_ms",
                "must be from 1 to 86400000 (one day)",
            );
        }
        for (i, origin) in s.cors_origins.iter().enumerate() {
            if origin != "*" && !is_origin(origin) {
                self.problem(
                    format!("server.cors_origins[{i}]"),
                    format!(
                        "\"{origin}\" is not an origin; write scheme://host[:port], such as \"https://app.example.com\", or \"*\""
                    ),
                );
            }
        }
        Some(ServerConfig {
            listen: listen?,
            max_body_bytes: usize::try_from(max_body_bytes).unwrap_or(usize::MAX),
            shutdown_grace: grace,
            body_timeout: Duration::from_millis(body_timeout_ms),
            keepalive_timeout: Duration::from_millis(keepalive_ms),
            send_timeout: Duration::from_millis(send_timeout_ms),
            allow_anonymous: s.allow_anonymous,
            cors_origins: s.cors_origins.clone(),
        })
    }

    fn backend(&mut self, i: usize, b: &RawBackend) -> Option<Backend> {
        let at = |field: &str| format!("backends[{i}].{field}");
        let Some(kind) = BackendKind::parse(&b.kind) else {
            self.problem(
                at("kind"),
                format!(
                    "unknown kind \"{}\"; expected one of: {}",
                    b.kind,
                    BackendKind::NAMES.join(", ")
                ),
            );
            return None;
        };
        let aws = self.aws(i, kind, b);
        let base_url = match (kind, b.base_url.as_deref()) {
            (BackendKind::Simulated, Some(_)) => {
                self.problem(
                    at("base_url"),
                    "a simulated backend has no base_url; remove it",
                );
                None
            }
            (BackendKind::Simulated, None) => None,
            (BackendKind::Tgi, Some(text)) if text.trim_end_matches('/').ends_with("/v1") => {
                self.problem(
                    at("base_url"),
                    format!("a tgi backend's base_url is the server's root (tollgate adds /v1/chat/completions or /generate); remove the /v1 from \"{text}\""),
                );
                None
            }
            (_, Some(text)) => self.url(at("base_url"), text),
            (BackendKind::Bedrock, None) => aws.as_ref().and_then(|aws| {
                let url = format!("https://bedrock-runtime.{}.amazonaws.com", aws.region);
                self.url(at("aws_region"), &url)
            }),
            (_, None) => match kind.default_base_url() {
                Some(url) => Some(Url::parse(url).expect("built-in base URLs parse")),
                None => {
                    let example = match kind {
                        BackendKind::Tgi => "http://10.0.0.5:8080",
                        _ => "http://10.0.0.5:8000/v1",
                    };
                    self.problem(
                        at("base_url"),
                        format!("a {} backend needs base_url, such as \"{example}\"", b.kind),
                    );
                    None
                }
            },
        };
        let credential = match (&b.api_key_env, kind) {
            (Some(_), BackendKind::Simulated) => {
                self.problem(
                    at("api_key_env"),
                    "a simulated backend takes no credential; remove it",
                );
                None
            }
            (Some(var), _) => self.secret(at("api_key_env"), var),
            (None, BackendKind::Together | BackendKind::Groq) => {
                self.problem(
                    at("api_key_env"),
                    format!("a {} backend needs api_key_env, the environment variable holding its API key", b.kind),
                );
                None
            }
            (None, _) => None,
        };
        let timeouts = self.timeouts(i, b);
        let (max_response_bytes, max_event_bytes) = self.response_caps(i, b);
        let simulated = match (&b.simulated, kind) {
            (Some(spec), BackendKind::Simulated) => self.simulated(i, spec),
            (Some(_), _) => {
                self.problem(
                    at("simulated"),
                    "only a backend of kind \"simulated\" takes this table",
                );
                SimulatedSpec::default()
            }
            (None, _) => SimulatedSpec::default(),
        };
        let region = b.region.as_ref().map(|r| self.region(at("region"), r));
        let self_hosted = self.self_hosted(i, b, kind);
        if b.max_concurrency == Some(0) {
            self.problem(at("max_concurrency"), "must be greater than 0");
        }
        let engine_metrics = self.engine_metrics(i, b, kind, base_url.as_ref());
        let tls = self.backend_tls(i, b, base_url.as_ref(), engine_metrics.as_ref());
        Some(Backend {
            name: b.name.clone(),
            kind,
            base_url,
            region,
            credential,
            aws,
            timeouts,
            max_response_bytes,
            max_event_bytes,
            simulated,
            self_hosted,
            max_concurrency: b.max_concurrency,
            engine_metrics,
            tls,
        })
    }

    /// A backend's TLS, for one reached over HTTPS (its base URL or its
    /// engine metrics).
    fn backend_tls(
        &mut self,
        i: usize,
        b: &RawBackend,
        base_url: Option<&Url>,
        engine_metrics: Option<&EngineMetrics>,
    ) -> ClientTls {
        let https = |url: &Url| url.scheme() == "https";
        let tls = base_url.is_some_and(https) || engine_metrics.is_some_and(|m| https(&m.url));
        let files = TlsFiles {
            ca_file: b.ca_file.as_deref(),
            cert_file: b.cert_file.as_deref(),
            key_file: b.key_file.as_deref(),
        };
        self.client_tls(
            &format!("backends[{i}]"),
            files,
            Some(tls),
            "applies only to a backend reached over https://; use an https base_url, or remove it",
        )
    }

    /// A client's TLS from the files its table names under `table`: the
    /// CA its server's certificate must chain to (else the system's
    /// roots), and a certificate and key to show a server that asks, both
    /// or neither. `tls`: whether the connection is TLS, `None` where its
    /// URL is not read (offline), when the files are checked alone; set
    /// for a connection without TLS, each is a problem saying `needs`.
    pub(super) fn client_tls(
        &mut self,
        table: &str,
        files: TlsFiles<'_>,
        tls: Option<bool>,
        needs: &str,
    ) -> ClientTls {
        let at = |field: &str| format!("{table}.{field}");
        if tls == Some(false) {
            for (field, set) in [
                ("ca_file", files.ca_file),
                ("cert_file", files.cert_file),
                ("key_file", files.key_file),
            ] {
                if set.is_some() {
                    self.problem(at(field), needs);
                }
            }
            return ClientTls::default();
        }
        let roots = match files.ca_file.map(|path| CaFile::read(Path::new(path))) {
            None => Roots::System,
            Some(Ok(file)) => Roots::File(file),
            Some(Err(e)) => {
                self.problem(at("ca_file"), e);
                Roots::System
            }
        };
        let identity = match (files.cert_file, files.key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => match Identity::read(Path::new(cert), Path::new(key)) {
                Ok(identity) => Some(Box::new(identity)),
                Err(e) => {
                    self.problem(at("cert_file"), e);
                    None
                }
            },
            (Some(_), None) => {
                self.problem(
                    at("key_file"),
                    "cert_file needs key_file, the certificate's private key in PEM",
                );
                None
            }
            (None, Some(_)) => {
                self.problem(
                    at("cert_file"),
                    "key_file needs cert_file, the client certificate in PEM",
                );
                None
            }
        };
        ClientTls { roots, identity }
    }

    fn url(&mut self, path: String, text: &str) -> Option<Url> {
        match Url::parse(text) {
            Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {
                if let Some(name) = secret_in_query(&url) {
                    self.problem(
                        path,
                        format!("must not hold credentials ({name}= in its query); a backend's API key goes in api_key_env"),
                    );
                    return None;
                }
                if url.query().is_some() || url.fragment().is_some() {
                    self.problem(path, "must not have a query or fragment");
                    return None;
                }
                // The gateway sends no credentials from a URL, and the
                // admin API shows the URL.
                if !url.username().is_empty() || url.password().is_some() {
                    self.problem(
                        path,
                        "must not hold credentials (user:password@); a backend's API key goes in api_key_env",
                    );
                    return None;
                }
                Some(url)
            }
            Ok(_) => {
                self.problem(
                    path,
                    format!("\"{text}\" must be an http:// or https:// URL with a host"),
                );
                None
            }
            Err(e) => {
                self.problem(path, format!("\"{text}\" is not a URL: {e}"));
                None
            }
        }
    }

    fn timeouts(&mut self, i: usize, b: &RawBackend) -> Timeouts {
        let mut ms = |field: &str, value: Option<u64>, default: u64| {
            let value = value.unwrap_or(default);
            if !(1..=MAX_WAIT_MS).contains(&value) {
                self.problem(
                    format!("backends[{i}].timeouts.{field}"),
                    "must be between 1 and 3600000 (one hour)",
                );
            }
            Duration::from_millis(value)
        };
        Timeouts {
            connect: ms("connect_ms", b.timeouts.connect_ms, DEFAULT_CONNECT_MS),
            first_byte: ms(
                "first_byte_ms",
                b.timeouts.first_byte_ms,
                DEFAULT_FIRST_BYTE_MS,
            ),
            idle: ms("idle_ms", b.timeouts.idle_ms, DEFAULT_IDLE_MS),
        }
    }

    /// `max_response_bytes` and `max_event_bytes`: an event never needs
    /// more room than the whole body may have.
    fn response_caps(&mut self, i: usize, b: &RawBackend) -> (u64, u64) {
        let body = b.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE_BYTES);
        if !(1024..=MAX_RESPONSE_CAP).contains(&body) {
            self.problem(
                format!("backends[{i}].max_response_bytes"),
                "must be between 1024 and 4294967296 (4 GiB)",
            );
        }
        let event = b
            .max_event_bytes
            .unwrap_or(DEFAULT_MAX_EVENT_BYTES.min(body));
        if !(1024..=body).contains(&event) {
            self.problem(
                format!("backends[{i}].max_event_bytes"),
                format!("must be between 1024 and the backend's max_response_bytes ({body})"),
            );
        }
        (body, event)
    }

    fn simulated(&mut self, i: usize, s: &RawSimulated) -> SimulatedSpec {
        let at = |field: &str| format!("backends[{i}].simulated.{field}");
        let default = SimulatedSpec::default();
        let spec = SimulatedSpec {
            ttft: s.ttft_ms.map_or(default.ttft, |ms| {
                Duration::from_millis(ms.min(MAX_WAIT_MS))
            }),
            tokens_per_second: s.tokens_per_second.unwrap_or(default.tokens_per_second),
            completion_tokens: s.completion_tokens.unwrap_or(default.completion_tokens),
            failure_rate: s.failure_rate.unwrap_or(default.failure_rate),
            prefix_cache_blocks: s.prefix_cache_blocks.unwrap_or(default.prefix_cache_blocks),
            slow_fraction: s.slow_fraction.unwrap_or(default.slow_fraction),
            slow_ttft: s.slow_ttft_ms.map_or(default.slow_ttft, |ms| {
                Duration::from_millis(ms.min(MAX_WAIT_MS))
            }),
        };
        if s.slow_ttft_ms.is_some_and(|ms| ms > MAX_WAIT_MS) {
            self.problem(at("slow_ttft_ms"), "must be at most 3600000 (one hour)");
        }
        if !(0.0..=1.0).contains(&spec.slow_fraction) {
            self.problem(at("slow_fraction"), "must be between 0.0 and 1.0");
        }
        if spec.prefix_cache_blocks > MAX_PREFIX_BLOCKS {
            self.problem(
                at("prefix_cache_blocks"),
                format!("must be at most {MAX_PREFIX_BLOCKS}; 0 turns the cache off"),
            );
        }
        if s.ttft_ms.is_some_and(|ms| ms > MAX_WAIT_MS) {
            self.problem(at("ttft_ms"), "must be at most 3600000 (one hour)");
        }
        if !(0.1..=100_000.0).contains(&spec.tokens_per_second) {
            self.problem(at("tokens_per_second"), "must be between 0.1 and 100000");
        }
        if !(1..=1_000_000).contains(&spec.completion_tokens) {
            self.problem(at("completion_tokens"), "must be between 1 and 1000000");
        }
        if !(0.0..=1.0).contains(&spec.failure_rate) {
            self.problem(at("failure_rate"), "must be between 0.0 and 1.0");
        }
        spec
    }

    /// `backends` maps each backend name to whether it is self-hosted.
    fn model(&mut self, i: usize, m: &RawModel, backends: &HashMap<&str, bool>) -> Model {
        if m.deployments.is_empty() {
            self.problem(
                format!("models[{i}].deployments"),
                format!(
                    "model \"{}\" has no deployments; add at least one [[models.deployments]]",
                    m.alias
                ),
            );
        }
        let deployments = m
            .deployments
            .iter()
            .enumerate()
            .map(|(j, d)| {
                self.deployment(
                    format!("models[{i}].deployments[{j}]"),
                    &m.alias,
                    d,
                    backends,
                )
            })
            .collect();
        Model {
            alias: m.alias.clone(),
            strategy: self.strategy(i, m),
            affinity: self.affinity(i, m, backends),
            hedge: m.hedge.as_ref().and_then(|h| self.hedge(i, m, h)),
            deployments,
        }
    }

    fn deployment(
        &mut self,
        at: String,
        alias: &str,
        d: &RawDeployment,
        backends: &HashMap<&str, bool>,
    ) -> Deployment {
        let self_hosted = backends.get(d.backend.as_str()).copied();
        if self_hosted.is_none() {
            let mut known: Vec<&str> = backends.keys().copied().collect();
            known.sort_unstable();
            self.problem(
                format!("{at}.backend"),
                format!(
                    "no backend named \"{}\" (backends: {})",
                    d.backend,
                    known.join(", ")
                ),
            );
        }
        if d.model.trim().is_empty() {
            self.problem(format!("{at}.model"), "must name the upstream model id");
        }
        let input = self.price(format!("{at}.input_usd_per_mtok"), d.input_usd_per_mtok);
        let price = Price {
            input_micro_usd_per_mtok: input,
            cached_input_micro_usd_per_mtok: d.cached_input_usd_per_mtok.map_or(input, |usd| {
                self.price(format!("{at}.cached_input_usd_per_mtok"), usd)
            }),
            cache_write_micro_usd_per_mtok: d.cache_write_usd_per_mtok.map_or(input, |usd| {
                self.price(format!("{at}.cache_write_usd_per_mtok"), usd)
            }),
            output_micro_usd_per_mtok: self
                .price(format!("{at}.output_usd_per_mtok"), d.output_usd_per_mtok),
        };
        if self_hosted == Some(true) && price != Price::default() {
            self.problem(
                format!("{at}.input_usd_per_mtok"),
                "this deployment's backend is self-hosted and priced by GPU-hour \
                 (gpu_hour_usd); remove its per-token prices",
            );
        }
        if d.weight == Some(0) {
            self.problem(
                format!("{at}.weight"),
                "must be greater than 0; remove the deployment to stop its traffic",
            );
        }
        if d.context_window == 0 {
            self.problem(format!("{at}.context_window"), "must be greater than 0");
        }
        let modalities = self.modalities(&at, d);
        if modalities.any_media() && !d.multimodal {
            self.problem(
                format!("{at}.multimodal"),
                "this deployment accepts images, audio or video, so its model is multimodal; set multimodal = true",
            );
        }
        let licence = d.licence.as_deref().and_then(|text| {
            let licence = Licence::parse(text);
            if licence.is_none() {
                self.problem(
                    format!("{at}.licence"),
                    format!(
                        "unknown licence \"{text}\"; expected one of: {} (any case), or leave it out",
                        Licence::NAMES.join(", ")
                    ),
                );
            }
            licence
        });
        Deployment {
            name: d
                .name
                .clone()
                .unwrap_or_else(|| format!("{alias}/{}", d.backend)),
            backend: d.backend.clone(),
            upstream_model: d.model.clone(),
            price,
            context_window: d.context_window,
            modalities,
            tools: d.tools,
            licence,
            multimodal: d.multimodal,
            weight: d.weight.unwrap_or(1),
            // Spillover fills self-hosted capacity before paying per token.
            tier: d.tier.unwrap_or(u32::from(self_hosted != Some(true))),
            limits: self.per_minute(&at, d.rpm, d.tpm),
            endpoints: self.endpoints(&at, d),
        }
    }

    /// Embeddings only where the backend has an OpenAI-compatible
    /// `/embeddings`.
    fn embedding_backends(&mut self, models: &[Model], backends: &[Backend]) {
        for (i, model) in models.iter().enumerate() {
            for (j, d) in model.deployments.iter().enumerate() {
                let Some(backend) = backends.iter().find(|b| b.name == d.backend) else {
                    continue;
                };
                if d.endpoints.embeddings && !Endpoints::EMBEDDING_KINDS.contains(&backend.kind) {
                    let kinds: Vec<&str> = Endpoints::EMBEDDING_KINDS
                        .iter()
                        .map(|k| k.name())
                        .collect();
                    self.problem(
                        format!("models[{i}].deployments[{j}].endpoints"),
                        format!(
                            "backend \"{}\" is of kind {}, which serves no OpenAI-compatible embeddings; kinds that do: {} (a TEI server is kind \"vllm\")",
                            backend.name,
                            backend.kind.name(),
                            kinds.join(", ")
                        ),
                    );
                }
            }
        }
    }

    fn endpoints(&mut self, at: &str, d: &RawDeployment) -> Endpoints {
        let Some(list) = &d.endpoints else {
            return Endpoints::default();
        };
        let mut e = Endpoints {
            chat: false,
            completions: false,
            embeddings: false,
        };
        for (k, name) in list.iter().enumerate() {
            let slot = match name.as_str() {
                "chat" => &mut e.chat,
                "completions" => &mut e.completions,
                "embeddings" => &mut e.embeddings,
                other => {
                    self.problem(
                        format!("{at}.endpoints[{k}]"),
                        format!(
                            "unknown endpoint \"{other}\"; expected one of: {}",
                            Endpoints::NAMES.join(", ")
                        ),
                    );
                    continue;
                }
            };
            if std::mem::replace(slot, true) {
                self.problem(
                    format!("{at}.endpoints[{k}]"),
                    format!("\"{name}\" is listed twice"),
                );
            }
        }
        if list.is_empty() {
            self.problem(
                format!("{at}.endpoints"),
                "lists nothing; name what the deployment serves, such as [\"chat\"], or remove the deployment",
            );
        }
        e
    }

    /// USD per million tokens → integer micro-dollars per million tokens.
    fn price(&mut self, path: String, usd: f64) -> u64 {
        if !usd.is_finite() || !(0.0..=1_000_000.0).contains(&usd) {
            self.problem(
                path,
                "must be a price in USD per million tokens between 0 and 1000000",
            );
            return 0;
        }
        let micro = usd * 1_000_000.0;
        if (micro - micro.round()).abs() > 1e-6 {
            self.problem(
                path,
                "prices are exact to the micro-dollar; use at most 6 decimal places",
            );
        }
        micro.round() as u64
    }

    fn modalities(&mut self, at: &str, d: &RawDeployment) -> Modalities {
        let mut m = Modalities {
            text: false,
            image: false,
            audio: false,
            video: false,
        };
        let Some(list) = &d.modalities else {
            m.text = true;
            return m;
        };
        for (k, name) in list.iter().enumerate() {
            match name.as_str() {
                "text" => m.text = true,
                "image" => m.image = true,
                "audio" => m.audio = true,
                "video" => m.video = true,
                other => self.problem(
                    format!("{at}.modalities[{k}]"),
                    format!("unknown modality \"{other}\"; expected text, image, audio or video"),
                ),
            }
        }
        if !m.text {
            self.problem(format!("{at}.modalities"), "must include \"text\"");
        }
        m
    }

    fn key(&mut self, i: usize, k: &RawKey, aliases: &HashSet<&str>) -> Option<Key> {
        let at = |field: &str| format!("keys[{i}].{field}");
        let sha256 = match (&k.sha256, &k.key_env) {
            (Some(hex_digest), None) => match hex::decode(hex_digest.trim()) {
                Ok(bytes) if bytes.len() == 32 => Some(bytes.try_into().expect("length checked")),
                _ => {
                    self.problem(
                        at("sha256"),
                        "must be 64 hex digits: the sha256 of the key, as `printf %s KEY | sha256sum` prints",
                    );
                    None
                }
            },
            // An offline config's key is found by name only (explain),
            // never by digest: it does not serve.
            (None, Some(var)) => {
                self.credential(at("key_env"), var)
                    .or(matches!(self.secrets, Secrets::Unread).then_some([0; 32]))
            }
            (Some(_), Some(_)) => {
                self.problem(
                    format!("keys[{i}]"),
                    "give either sha256 or key_env, not both",
                );
                None
            }
            (None, None) => {
                self.problem(
                    format!("keys[{i}]"),
                    "needs sha256 (the key's sha256 in hex) or key_env (the environment variable holding the key)",
                );
                None
            }
        };
        for (j, alias) in k.models.iter().enumerate() {
            if alias != "*" && !aliases.contains(alias.as_str()) {
                self.problem(
                    format!("keys[{i}].models[{j}]"),
                    format!(
                        "no model with alias \"{alias}\"; use a models[].alias, or \"*\" for all"
                    ),
                );
            }
        }
        if k.models.is_empty() {
            self.problem(
                at("models"),
                "lists no models; name the aliases this key may use (`models = [\"chat\"]`), or every alias (`models = [\"*\"]`)",
            );
        }
        let models = if k.models.iter().any(|m| m == "*") {
            AllowedModels::All
        } else {
            AllowedModels::Only(k.models.clone())
        };
        let region = k.region.as_ref().map(|r| self.region(at("region"), r));
        Some(Key {
            name: k.name.clone(),
            sha256: sha256?,
            models,
            region,
            region_header: k.region_header,
            budget: self.budget(i, k),
            limits: self.per_minute(&format!("keys[{i}]"), k.rpm, k.tpm),
            metrics: k.metrics,
        })
    }
}

/// Whether `text` is a web origin as browsers send it: `http` or `https`,
/// a host, an optional port, and nothing after.
fn is_origin(text: &str) -> bool {
    match url::Url::parse(text) {
        Ok(url) => {
            matches!(url.scheme(), "http" | "https")
                && url.host_str().is_some()
                && url.origin().ascii_serialization() == text
        }
        Err(_) => false,
    }
}
