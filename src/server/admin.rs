//! Admin endpoints, behind the admin token (`[admin] token_env`); without
//! one configured they answer 404, as if they did not exist.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use time::Date;
use time::macros::format_description;

use crate::error::{GatewayError, echo};
use crate::ledger::{Unavailable, YEARS};
use crate::pipeline::admit::{ExplainRequest, explain};
use crate::pipeline::respond::json_response;
use crate::pipeline::{auth, compressed, read_body};
use crate::state::{AppState, ReloadError, ReloadReport, Snapshot};

const DAY: &[time::format_description::BorrowedFormatItem<'_>] =
    format_description!("[year]-[month]-[day]");

fn answer<T: Serialize>(result: Result<T, GatewayError>) -> Response {
    match result {
        Ok(body) => json_response(
            StatusCode::OK,
            serde_json::to_vec(&body).expect("admin answers serialise"),
        ),
        Err(e) => e.into_response(),
    }
}

/// `POST /admin/explain`: the plan the live state would make.
pub async fn explain_plan(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    body: Body,
) -> Response {
    let snapshot = app.snapshot.load_full();
    let body = match authorised_body(&snapshot, &headers, &method, &uri, &[], body).await {
        Ok((_, body)) => body,
        Err(e) => return e.into_response(),
    };
    answer(
        serde_json::from_slice::<ExplainRequest>(&body)
            .map_err(|e| {
                // serde quotes the field or value it refused: the caller's.
                GatewayError::bad_request(
                    format!(
                        "the body must be {{\"request\": {{...}}, \"region\"?, \"key\"?}}: {}",
                        echo(&e.to_string())
                    ),
                    None,
                )
            })
            .and_then(|ask| explain(&snapshot, &ask)),
    )
}

/// The query parameters of an admin call, each one of `known` (see
/// [`params`]), read once its token is checked.
fn authorised(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    known: &[&str],
) -> Result<HashMap<String, String>, GatewayError> {
    auth::authenticate_admin(snapshot, headers, &format!("{method} {}", uri.path()))?;
    params(uri, known)
}

/// The query parameters and body of an admin call, the body read only
/// once its token and query are checked: a caller without the token costs
/// no more than its request head.
async fn authorised_body(
    snapshot: &Snapshot,
    headers: &HeaderMap,
    method: &Method,
    uri: &Uri,
    known: &[&str],
    body: Body,
) -> Result<(HashMap<String, String>, Bytes), GatewayError> {
    let params = authorised(snapshot, headers, method, uri, known)?;
    if let Some(refusal) = compressed(headers) {
        return Err(refusal);
    }
    Ok((
        params,
        read_body(headers, body, &snapshot.config.server).await?,
    ))
}

#[derive(Debug, Serialize)]
struct SpendRow {
    day: String,
    key: String,
    model: String,
    deployment: String,
    api: String,
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

#[derive(Debug, Serialize)]
struct Spend {
    key: Option<String>,
    from: Option<String>,
    to: Option<String>,
    rows: Vec<SpendRow>,
    total: SpendTotal,
}

#[derive(Debug, Default, Serialize)]
struct SpendTotal {
    requests: u64,
    input_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

fn day(params: &HashMap<String, String>, name: &str) -> Result<Option<Date>, GatewayError> {
    params
        .get(name)
        .map(|text| {
            let refused = |message: String| GatewayError::bad_request(message, Some(name.into()));
            // `time` also reads a signed year (`-0001`, `+2026`).
            let date = Date::parse(text, DAY)
                .ok()
                .filter(|_| text.len() == 10)
                .ok_or_else(|| {
                    refused(format!(
                        "`{name}` must be a date as YYYY-MM-DD, such as 2026-11-28"
                    ))
                })?;
            if !YEARS.contains(&date.year()) {
                return Err(refused(format!(
                    "`{name}` is in the year {}; ask for a day from {}-01-01 to {}-12-31",
                    date.year(),
                    YEARS.start(),
                    YEARS.end()
                )));
            }
            Ok(date)
        })
        .transpose()
}

/// `GET /admin/licence?month=YYYY-MM`: per calendar month (every month
/// the ledger holds, or the one asked for), the Llama end users, what
/// each licence served and the EU multimodal refusals.
pub async fn licence(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
) -> Response {
    let snapshot = app.snapshot.load_full();
    let asked = authorised(&snapshot, &headers, &method, &uri, &["month"]).and_then(|params| {
        params
            .get("month")
            .map(|m| {
                crate::licence::parse_month(m)
                    .map_err(|e| GatewayError::bad_request(e, Some("month".into())))
            })
            .transpose()
    });
    let month = match asked {
        Ok(month) => month,
        Err(e) => return e.into_response(),
    };
    match app.licence.report(&app.ledger, month.as_deref()).await {
        Ok(months) => answer(Ok(crate::licence::Report::new(
            months,
            &snapshot.config.licence,
        ))),
        Err(e) => {
            tracing::warn!(error = %e, "/admin/licence cannot read the ledger");
            GatewayError::ledger_unavailable(LEDGER_RETRY).into_response()
        }
    }
}

/// The query's parameters, each one of `known`, given once and not
/// empty: a 400 names the first that is not, so that a misspelt `dry_run`
/// or a filter given twice is never read as something else.
fn params(uri: &Uri, known: &[&str]) -> Result<HashMap<String, String>, GatewayError> {
    let query = uri.query().unwrap_or_default();
    let mut params = HashMap::new();
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        if !known.contains(&&*name) {
            return Err(GatewayError::bad_request(
                format!(
                    "unknown parameter `{}`; {}",
                    echo(&name),
                    match known {
                        [one] => format!("use {one}"),
                        [rest @ .., last] => format!("use {} and {last}", rest.join(", ")),
                        [] => "this call takes none".to_owned(),
                    }
                ),
                Some(echo(&name)),
            ));
        }
        if value.is_empty() {
            return Err(GatewayError::bad_request(
                format!("`{name}` is empty; give it a value, or leave it out"),
                Some(name.into_owned()),
            ));
        }
        if params
            .insert(name.to_string(), value.into_owned())
            .is_some()
        {
            return Err(GatewayError::bad_request(
                format!("`{name}` is given twice; give it once"),
                Some(name.into_owned()),
            ));
        }
    }
    Ok(params)
}

/// How long `/admin/spend` tells a caller to wait when the fleet's ledger
/// database cannot be reached.
const LEDGER_RETRY: Duration = Duration::from_secs(5);

/// `GET /admin/spend?key=NAME&from=YYYY-MM-DD&to=YYYY-MM-DD`: spend per
/// day, key, model and deployment from the ledger (all filters optional,
/// dates inclusive, UTC); with PostgreSQL, the whole fleet's, or 503 while
/// the database cannot be reached.
pub async fn spend(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
) -> Response {
    let snapshot = app.snapshot.load_full();
    let asked =
        authorised(&snapshot, &headers, &method, &uri, &["key", "from", "to"]).and_then(|params| {
            let (from, to) = (day(&params, "from")?, day(&params, "to")?);
            if let (Some(from), Some(to)) = (from, to)
                && to < from
            {
                return Err(GatewayError::bad_request(
                    "`to` is before `from`: the range is inclusive, from its first day to its last",
                    Some("to".into()),
                ));
            }
            Ok((params, from, to))
        });
    let (params, from, to) = match asked {
        Ok(asked) => asked,
        Err(e) => return e.into_response(),
    };
    let key = params.get("key").cloned();
    let rows = match app.ledger.report(key.as_deref(), from, to).await {
        Ok(rows) => rows,
        Err(Unavailable(e)) => {
            tracing::warn!(error = %e, "/admin/spend cannot read the ledger's PostgreSQL");
            return GatewayError::ledger_unavailable(LEDGER_RETRY).into_response();
        }
    };
    let mut total = SpendTotal::default();
    let mut total_nano = 0u64;
    let rows = rows
        .into_iter()
        .map(|(row, t)| {
            total.requests += t.requests;
            total.input_tokens += t.input_tokens;
            total.output_tokens += t.output_tokens;
            total_nano += t.cost_nano_usd;
            SpendRow {
                day: row.day.format(DAY).unwrap_or_default(),
                key: row.key,
                model: row.model,
                deployment: row.deployment,
                api: row.api.into_owned(),
                requests: t.requests,
                input_tokens: t.input_tokens,
                output_tokens: t.output_tokens,
                cost_usd: t.cost_nano_usd as f64 / 1e9,
            }
        })
        .collect();
    total.cost_usd = total_nano as f64 / 1e9;
    answer(Ok(Spend {
        key,
        from: params.get("from").cloned(),
        to: params.get("to").cloned(),
        rows,
        total,
    }))
}

/// `GET /admin/status`: what this replica runs on: its config version,
/// whether it drains, and where its budgets and limits live — with
/// `degraded: true` while a shared store does not answer.
pub async fn status(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
) -> Response {
    let snapshot = app.snapshot.load_full();
    answer(
        authorised(&snapshot, &headers, &method, &uri, &[]).map(|_| {
            let state = match &app.fleet {
                None => serde_json::json!({"backend": "memory", "degraded": false, "replicas": 1}),
                Some(fleet) => serde_json::json!({
                    "backend": "redis",
                    "degraded": fleet.is_degraded(),
                    "on_unavailable": match fleet.on_unavailable {
                        crate::config::OnUnavailable::Local => "local",
                        crate::config::OnUnavailable::Refuse => "refuse",
                    },
                    "replicas": fleet.replicas(),
                    "budget_share": fleet.budget_share(),
                }),
            };
            serde_json::json!({
                "config_version": snapshot.config.version,
                "draining": app.is_draining(),
                "state": state,
            })
        }),
    )
}

/// `POST /admin/reload[?dry_run=true]`: validates the candidate config
/// (the body, as TOML; without a body, the config file) and applies it
/// unless it is a dry run. 422 with every problem when it is invalid.
pub async fn reload(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
    body: Body,
) -> Response {
    let snapshot = app.snapshot.load_full();
    let (params, body) =
        match authorised_body(&snapshot, &headers, &method, &uri, &["dry_run"], body).await {
            Ok(asked) => asked,
            Err(e) => return e.into_response(),
        };
    let dry_run = match params.get("dry_run").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return GatewayError::bad_request(
                format!("dry_run must be true or false, not \"{}\"", echo(other)),
                Some("dry_run".into()),
            )
            .into_response();
        }
    };
    let text = match std::str::from_utf8(&body) {
        Ok(text) if text.trim().is_empty() => None,
        Ok(text) => Some(text.to_owned()),
        Err(_) => {
            return GatewayError::bad_request("the candidate config must be UTF-8 TOML", None)
                .into_response();
        }
    };
    let outcome = tokio::task::spawn_blocking(move || app.reload(text, dry_run)).await;
    match outcome {
        Ok(Ok(report)) => answer::<ReloadReport>(Ok(report)),
        Ok(Err(ReloadError::Invalid(problems))) => {
            let error = GatewayError::bad_request(
                format!(
                    "the candidate config is invalid; the running config stays: {}",
                    problems
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
                None,
            );
            let mut body: serde_json::Value =
                serde_json::from_slice(&error.body_json()).expect("error bodies are JSON");
            body["problems"] = serde_json::to_value(&problems).expect("problems serialise");
            json_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                serde_json::to_vec(&body).expect("JSON serialises"),
            )
        }
        Ok(Err(ReloadError::NoFile(message))) => {
            GatewayError::bad_request(message, None).into_response()
        }
        Err(_) => GatewayError::internal("the reload task failed").into_response(),
    }
}

#[derive(Serialize)]
struct ActiveConfig<'a, C> {
    version: &'a str,
    config: C,
}

/// `GET /admin/config`: the running config's version and content, key
/// digests redacted (secrets are never in the file).
pub async fn active_config(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    method: Method,
    uri: Uri,
) -> Response {
    let snapshot = app.snapshot.load_full();
    answer(
        authorised(&snapshot, &headers, &method, &uri, &[]).map(|_| ActiveConfig {
            version: &snapshot.config.version,
            config: snapshot.config.written(),
        }),
    )
}
