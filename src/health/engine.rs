//! Load signals from the inference engines themselves: each backend with
//! `engine_metrics` has its Prometheus endpoint scraped on an interval.
//! vLLM reports `vllm:num_requests_waiting`, `vllm:num_requests_running`
//! and `vllm:kv_cache_usage_perc` (`vllm:gpu_cache_usage_perc` before
//! v0.10), and its prefix cache's `vllm:prefix_cache_queries_total` and
//! `vllm:prefix_cache_hits_total` (prompt tokens looked up and found; the
//! V0 engine's `vllm:gpu_prefix_cache_hit_rate` gauge before them), per
//! served model (its `model_name` label); TGI reports `tgi_queue_size`
//! and `tgi_batch_current_size`.

use std::sync::Arc;
use std::time::Instant;

use http_body_util::BodyExt;
use tokio::task::JoinHandle;

use super::backend::{BackendLive, EngineSignals, ModelCache, PrefixCounters};
use crate::config::{Backend, ClientTls, EngineMetrics};
use crate::providers::http::{self, HttpClient, Target};

/// What one scrape read: the engine's load, and its prefix cache per
/// served model.
#[derive(Debug, PartialEq)]
pub struct Scrape {
    pub signals: EngineSignals,
    pub prefix_caches: Vec<ModelCache>,
}

/// One sample of the page: its name, its `model_name` label, its value.
struct Sample<'t> {
    name: &'t str,
    model: Option<String>,
    value: f64,
}

/// Reads the signals from a metrics page; `None` when it has no load
/// signals. Load values are summed over label sets (one per model an
/// engine serves); prefix-cache counters are summed per model.
pub fn parse(text: &str, at: Instant) -> Option<Scrape> {
    let samples: Vec<Sample<'_>> = text.lines().filter_map(sample).collect();
    let values = |name: &'static str| {
        samples
            .iter()
            .filter(move |s| s.name == name)
            .map(|s| s.value)
    };
    let sum = |name: &'static str| values(name).reduce(|a, b| a + b);
    let mean = |name: &'static str| sum(name).map(|total| total / values(name).count() as f64);
    let waiting = sum("vllm:num_requests_waiting").or_else(|| sum("tgi_queue_size"));
    let running = sum("vllm:num_requests_running").or_else(|| sum("tgi_batch_current_size"));
    let kv_cache = mean("vllm:kv_cache_usage_perc").or_else(|| mean("vllm:gpu_cache_usage_perc"));
    if waiting.is_none() && running.is_none() && kv_cache.is_none() {
        return None;
    }
    Some(Scrape {
        signals: EngineSignals {
            waiting: waiting.unwrap_or(0.0),
            running: running.unwrap_or(0.0),
            kv_cache,
            at,
        },
        prefix_caches: prefix_caches(&samples),
    })
}

/// Per model: vLLM's prefix-cache counters summed over its other labels
/// (one set per engine of a data-parallel server), or the V0 engine's
/// hit-rate gauge, averaged.
fn prefix_caches(samples: &[Sample<'_>]) -> Vec<ModelCache> {
    let mut caches: Vec<(ModelCache, [f64; 3], u32)> = Vec::new();
    for s in samples {
        let slot = match s.name {
            "vllm:prefix_cache_hits_total" => 0,
            "vllm:prefix_cache_queries_total" => 1,
            "vllm:gpu_prefix_cache_hit_rate" => 2,
            _ => continue,
        };
        let Some(model) = &s.model else { continue };
        let at = match caches.iter().position(|(c, ..)| &c.model == model) {
            Some(at) => at,
            None => {
                let cache = ModelCache {
                    model: model.clone(),
                    counters: None,
                    rate: None,
                };
                caches.push((cache, [f64::NAN; 3], 0));
                caches.len() - 1
            }
        };
        let (_, sums, gauges) = &mut caches[at];
        sums[slot] = if sums[slot].is_nan() {
            s.value
        } else {
            sums[slot] + s.value
        };
        *gauges += u32::from(slot == 2);
    }
    caches
        .into_iter()
        .map(|(mut cache, [hits, queries, rates], gauges)| {
            if !hits.is_nan() && !queries.is_nan() {
                cache.counters = Some(PrefixCounters { hits, queries });
            }
            if !rates.is_nan() {
                cache.rate = Some(rates / f64::from(gauges));
            }
            cache
        })
        .collect()
}

/// One sample line of the Prometheus text format: `name{labels} value
/// [timestamp]`. Written here because the `prometheus-parse` crate rejects
/// the `:` that every vLLM metric name has.
fn sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let (name, mut rest) = line.split_at(name_end);
    let mut model = None;
    if let Some(labels) = rest.strip_prefix('{') {
        let (read, after) = self::labels(labels)?;
        model = read;
        rest = after;
    }
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample { name, model, value })
}

/// Reads `name="value",...}`: the `model_name` label's value, unescaped,
/// and what follows the `}`. A quoted value may hold `}`, `,` or an
/// escaped quote.
fn labels(text: &str) -> Option<(Option<String>, &str)> {
    let mut model = None;
    let mut rest = text.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Some((model, after));
        }
        let (name, after) = rest.split_once('=')?;
        let mut chars = after.trim_start().strip_prefix('"')?.char_indices();
        let mut value = String::new();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        if name.trim() == "model_name" {
            model = Some(value);
        }
        let after = after.trim_start()[1 + end + 1..].trim_start();
        rest = after.strip_prefix(',').unwrap_or(after).trim_start();
    }
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
                    backend.tls.clone(),
                    live.clone(),
                )))
            })
            .collect(),
    )
}

async fn scrape_loop(
    backend: String,
    metrics: EngineMetrics,
    tls: ClientTls,
    live: Arc<BackendLive>,
) {
    let client = http::new_client(&metrics.url, metrics.interval, &tls).and_then(|client| {
        let target = http::target(&backend, metrics.url.as_str())?;
        Ok((client, target))
    });
    let (client, target) = match client {
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
        match scrape(&client, &target, &metrics).await {
            Ok(scrape) => {
                if failing {
                    tracing::info!(backend, "engine metrics scrape recovered");
                    failing = false;
                }
                // Caches first: a page that shows the load shows them too.
                live.set_prefix_caches(scrape.prefix_caches, scrape.signals.at);
                live.set_engine(scrape.signals);
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
    target: &Target,
    metrics: &EngineMetrics,
) -> Result<Scrape, String> {
    let request = http::get(target);
    let page = tokio::time::timeout(metrics.interval, async {
        let response = client.request(request).await.map_err(|e| e.to_string())?;
        if !response.status.is_success() {
            return Err(format!("the page answered {}", response.status));
        }
        let body = response.body.collect().await;
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

    fn signals(text: &str) -> Option<EngineSignals> {
        parse(text, Instant::now()).map(|scrape| scrape.signals)
    }

    #[test]
    fn reads_vllm_new_and_old_names_and_tgi() {
        let vllm = "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 3.0\n\
            # TYPE vllm:num_requests_running gauge\nvllm:num_requests_running{engine=\"0\",model_name=\"m\"} 12.0\n\
            # TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.5\n";
        let s = signals(vllm).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (3.0, 12.0, Some(0.5)));
        let old = "vllm:num_requests_waiting{model_name=\"m\"} 0.0\nvllm:gpu_cache_usage_perc{model_name=\"m\"} 0.25\n";
        assert_eq!(signals(old).unwrap().kv_cache, Some(0.25));
        let tgi = "# TYPE tgi_queue_size gauge\ntgi_queue_size 4\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 7\n";
        let s = signals(tgi).unwrap();
        assert_eq!((s.waiting, s.running, s.kv_cache), (4.0, 7.0, None));
        assert_eq!(signals("process_cpu_seconds_total 1\n"), None);
        let tricky = "vllm:num_requests_running{model_name=\"a}\\\"b\"} 2 1700000000\nvllm:num_requests_running{model_name=\"c\"} 1\n";
        assert_eq!(signals(tricky).unwrap().running, 3.0, "summed over models");
    }

    #[test]
    fn prefix_cache_counters_are_read_per_served_model() {
        let page = "vllm:num_requests_running{model_name=\"m\"} 1\n\
            # TYPE vllm:prefix_cache_queries counter\n\
            vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"m\"} 4000.0\n\
            vllm:prefix_cache_queries_total{engine=\"1\",model_name=\"m\"} 1000.0\n\
            vllm:prefix_cache_queries_total{model_name=\"org/n \\\"v2\\\", fast\",engine=\"0\"} 10\n\
            # TYPE vllm:prefix_cache_hits counter\n\
            vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"m\"} 3000.0\n\
            vllm:prefix_cache_hits_total{engine=\"1\",model_name=\"m\"} 500.0\n\
            vllm:prefix_cache_hits_total{model_name=\"org/n \\\"v2\\\", fast\",engine=\"0\"} 1\n\
            vllm:prefix_cache_hits_total 7\n";
        let caches = parse(page, Instant::now()).unwrap().prefix_caches;
        let counters = |hits, queries| Some(PrefixCounters { hits, queries });
        assert_eq!(
            caches,
            vec![
                ModelCache {
                    model: "m".into(),
                    counters: counters(3500.0, 5000.0),
                    rate: None
                },
                ModelCache {
                    model: "org/n \"v2\", fast".into(),
                    counters: counters(1.0, 10.0),
                    rate: None
                },
            ],
            "summed over engines; a sample without a model is no model's"
        );
        let v0 = "vllm:num_requests_running{model_name=\"m\"} 1\n\
            vllm:gpu_prefix_cache_hit_rate{model_name=\"m\",engine=\"0\"} 0.4\n\
            vllm:gpu_prefix_cache_hit_rate{model_name=\"m\",engine=\"1\"} 0.6\n";
        let caches = parse(v0, Instant::now()).unwrap().prefix_caches;
        assert_eq!(caches[0].rate, Some(0.5));
        assert_eq!(caches[0].counters, None);
    }
}
