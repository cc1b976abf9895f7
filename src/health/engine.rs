//! Load signals from the inference engines themselves: each backend with
//! `engine_metrics` has its Prometheus endpoint scraped on an interval.
//! vLLM reports `vllm:num_requests_waiting`, `vllm:num_requests_running`
//! and `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before
//! v0.10), and its prefix cache's `vllm:prefix_cache_queries_total` and
//! `vllm:prefix_cache_hits_total` (prompt tokens looked up and found; the
//! V0 engine's `vllm:gpu_prefix_cache_hit_rate` gauge before them); TGI
//! reports `tgi_queue_size` and `tgi_batch_current_size`.

use std::sync::Arc;
use std::time::Instant;

use axum::http::{Request, Uri};
use http_body_util::{BodyExt, Full};
use tokio::task::JoinHandle;

use super::backend::{BackendLive, EngineSignals, PrefixCounters};
use crate::config::{Backend, EngineMetrics};
use crate::providers::http::{self, HttpClient};

/// Reads the signals from a metrics page; `None` when it has none of them.
/// Values are summed over label sets (one per model an engine serves).
pub fn parse(text: &str, at: Instant) -> Option<EngineSignals> {
    let samples: Vec<(&str, f64)> = text.lines().filter_map(sample).collect();
    let values = |name: &'static str| {
        samples
            .iter()
            .filter(move |(n, _)| *n == name)
            .map(|(_, v)| *v)
    };
    let sum = |name: &'static str| values(name).reduce(|a, b| a + b);
    let mean = |name: &'static str| sum(name).map(|total| total / values(name).count() as f64);
    let waiting = sum("vllm:num_requests_waiting").or_else(|| sum("tgi_queue_size"));
    let running = sum("vllm:num_requests_running").or_else(|| sum("tgi_batch_current_size"));
    let kv_cache = mean("vllm:kv_cache_usage_perc").or_else(|| mean("vllm:gpu_cache_usage_perc"));
    let prefix_cache = match (
        sum("vllm:prefix_cache_hits_total"),
        sum("vllm:prefix_cache_queries_total"),
    ) {
        (Some(hits), Some(queries)) => Some(PrefixCounters { hits, queries }),
        _ => None,
    };
    if waiting.is_none() && running.is_none() && kv_cache.is_none() {
        return None;
    }
    Some(EngineSignals {
        waiting: waiting.unwrap_or(0.0),
        running: running.unwrap_or(0.0),
        kv_cache,
        prefix_cache,
        prefix_hit_rate: mean("vllm:gpu_prefix_cache_hit_rate"),
        at,
    })
}

/// One sample line of the Prometheus text format: `name{labels} value
/// [timestamp]`. Written here because the `prometheus-parse` crate rejects
/// the `:` that every vLLM metric name has.
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    if rest.starts_with('{') {
        // Skip the labels; a quoted value may hold `}` or an escaped quote.
        let mut quoted = false;
        let mut escaped = false;
        let close = rest.char_indices().find_map(|(i, c)| {
            match c {
                _ if escaped => escaped = false,
                '\\' if quoted => escaped = true,
                '"' => quoted = !quoted,
                '}' if !quoted => return Some(i),
                _ => {}
            }
            None
        })?;
        rest = &rest[close + 1..];
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some((name, value))
}

/// The scrape tasks of one snapshot; dropping them stops them.
#[derive(Default)]
pub struct Scrapers(Vec<JoinHandle<()>>);

impl Drop for Scrapers {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts one scrape loop per backend that has `engine_metrics`.
pub fn spawn(backends: &[Backend], live: &[Arc<BackendLive>]) -> Scrapers {
    Scrapers(
        backends
            .iter()
            .zip(live)
            .filter_map(|(backend, live)| {
                let metrics = backend.engine_metrics.clone()?;
                Some(tokio::spawn(scrape_loop(
                    backend.name.clone(),
                    metrics,
                    live.clone(),
                )))
            })
            .collect(),
    )
}

async fn scrape_loop(backend: String, metrics: EngineMetrics, live: Arc<BackendLive>) {
    let client = http::new_client(&metrics.url, metrics.interval).and_then(|client| {
        let uri = http::target(&backend, metrics.url.as_str())?.uri;
        Ok((client, uri))
    });
    let (client, uri) = match client {
        Ok(built) => built,
        Err(error) => {
            tracing::error!(backend, error, "engine metrics are not scraped");
            return;
        }
    };
    let mut tick = tokio::time::interval(metrics.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match scrape(&client, &uri, &metrics).await {
            Ok(signals) => {
                if failing {
                    tracing::info!(backend, "engine metrics scrape recovered");
                    failing = false;
                }
                live.set_engine(signals);
            }
            Err(error) if !failing => {
                // Logged once per outage; the signals go stale on their own.
                tracing::warn!(backend, url = %metrics.url, error, "engine metrics scrape failed");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// One `GET` of the metrics page, within one scrape interval.
async fn scrape(
    client: &HttpClient,
    uri: &Uri,
    metrics: &EngineMetrics,
) -> Result<EngineSignals, String> {
    let mut request = Request::new(Full::default());
    *request.uri_mut() = uri.clone();
    let page = tokio::time::timeout(metrics.interval, async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("the page answered {}", response.status()));
        }
        let body = response.into_body().collect().await;
        Ok(body.map_err(|e| e.to_string())?.to_bytes())
    })
    .await
    .map_err(|_| format!("no answer within {:?}", metrics.interval))??;
    let text = std::str::from_utf8(&page).map_err(|e| e.to_string())?;
    parse(text, Instant::now()).ok_or_else(|| "no vLLM or TGI load metrics on the page".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_vllm_new_and_old_names_and_tgi() {
        let now = Instant::now();
        let vllm = "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 12.0\n\
            # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        let s = parse(vllm, now).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (3.0, 12.0, Some(0.5)));
        let old = "vllm:num_requests_waiting{model_name=\"m\"} 0.0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n";
        assert_eq!(parse(old, now).unwrap().kv_cache, Some(0.25));
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 7\n";
        let s = parse(tgi, now).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (4.0, 7.0, None));
        assert_eq!(parse("process_cpu_seconds_total 1\n", now), None);
        let cached = "vllm:num_requests_running{model_name=\"m\"} 1\n\
            # TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{model_name=\"m\"} 4000.0\n\
            # TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{model_name=\"m\"} 3000.0\n";
        let s = parse(cached, now).unwrap();
        assert_eq!(
            s.prefix_cache,
            Some(PrefixCounters {
                hits: 3000.0,
                queries: 4000.0
            })
        );
        let v0 = "vllm:num_requests_running{model_name=\"m\"} 1\nvllm:gpu_prefix_cache_hit_rate{model_name=\"m\"} 0.4\n";
        assert_eq!(parse(v0, now).unwrap().prefix_hit_rate, Some(0.4));
        let tricky = "vllm:num_requests_running{model_name=\"a}\\\"b\"} 2 1700000000\nvllm:num_requests_running{model_name=\"c\"} 1\n";
        assert_eq!(
            parse(tricky, now).unwrap().running,
            3.0,
            "summed; labels skipped"
        );
    }
}
