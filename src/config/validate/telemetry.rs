//! Validation of `[logging]` and `[tracing]`: how the gateway reports on
//! itself.

use url::Url;

use super::super::schema::RawConfig;
use super::super::secret_query::secret_in_query;
use super::super::types::*;
use super::Validator;

const DEFAULT_SERVICE_NAME: &str = "tollgate";
/// The OTLP/HTTP path of traces under a collector's base URL (the
/// OpenTelemetry exporter specification's `OTEL_EXPORTER_OTLP_ENDPOINT`).
const TRACES_PATH: &str = "v1/traces";

impl Validator<'_> {
    pub(super) fn logging(&mut self, raw: &RawConfig) -> LogFormat {
        match raw.logging.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                self.problem(
                    "logging.format",
                    format!("\"{other}\" is not a log format; use \"text\" (the default) or \"json\" (one object per line)"),
                );
                LogFormat::Text
            }
        }
    }

    pub(super) fn tracing(&mut self, raw: &RawConfig) -> Option<TracingSettings> {
        let t = &raw.tracing;
        let Some(endpoint) = &t.otlp_endpoint else {
            for (field, set) in [
                ("service_name", t.service_name.is_some()),
                ("sample_ratio", t.sample_ratio.is_some()),
            ] {
                if set {
                    self.problem(
                        format!("tracing.{field}"),
                        "applies only with otlp_endpoint, where spans are sent; set that, or remove this field",
                    );
                }
            }
            return None;
        };
        let traces_url = self.traces_url(endpoint);
        let service_name = t
            .service_name
            .clone()
            .unwrap_or_else(|| DEFAULT_SERVICE_NAME.to_owned());
        if service_name.trim().is_empty() {
            self.problem(
                "tracing.service_name",
                "must not be empty; it names this gateway in the tracing backend, such as \"tollgate\"",
            );
        }
        let sample_ratio = t.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            self.problem(
                "tracing.sample_ratio",
                "must be between 0 and 1: the share of requests without a sampled traceparent that are traced",
            );
        }
        Some(TracingSettings {
            traces_url: traces_url?,
            service_name,
            sample_ratio,
        })
    }

    /// The collector's traces URL: `otlp_endpoint` is its base URL, as in
    /// OpenTelemetry's own settings, unless it already ends in `/v1/traces`.
    fn traces_url(&mut self, endpoint: &str) -> Option<String> {
        const FIELD: &str = "tracing.otlp_endpoint";
        let Ok(mut url) = Url::parse(endpoint) else {
            self.problem(
                FIELD,
                format!("\"{endpoint}\" is not a URL; write the collector's OTLP/HTTP address, such as \"http://otel-collector:4318\""),
            );
            return None;
        };
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            self.problem(
                FIELD,
                "must be an http:// or https:// address of an OTLP/HTTP collector, such as \"http://otel-collector:4318\" (gRPC is not supported)",
            );
            return None;
        }
        // The exporter sends the headers of OTEL_EXPORTER_OTLP_HEADERS
        // (or OTEL_EXPORTER_OTLP_TRACES_HEADERS) with every export.
        let in_query = secret_in_query(&url).map(|name| format!(" ({name}= in its query)"));
        if !url.username().is_empty() || url.password().is_some() || in_query.is_some() {
            self.problem(
                FIELD,
                format!("must not hold credentials{}; set them as headers in OTEL_EXPORTER_OTLP_HEADERS, such as \"authorization=Bearer …\"", in_query.unwrap_or_default()),
            );
            return None;
        }
        if !url.path().trim_end_matches('/').ends_with(TRACES_PATH) {
            let path = format!("{}/{TRACES_PATH}", url.path().trim_end_matches('/'));
            url.set_path(&path);
        }
        Some(url.into())
    }
}
