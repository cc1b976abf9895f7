//! Admin endpoints, behind the admin token (`[admin] token_env`); without
//! one configured they answer 404, as if they did not exist.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use time::Date;
use time::macros::format_description;

use super::explain::{ExplainRequest, explain};
use super::{AppState, auth, json_response};
use crate::error::GatewayError;

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
    uri: Uri,
    body: axum::body::Bytes,
) -> Response {
    let snapshot = app.snapshot.load_full();
    answer(
        auth::authenticate_admin(&snapshot, &headers, uri.path()).and_then(|()| {
            let ask: ExplainRequest = serde_json::from_slice(&body).map_err(|e| {
                GatewayError::bad_request(
                    format!(
                        "the body must be {{\"request\": {{...}}, \"region\"?, \"key\"?}}: {e}"
                    ),
                    None,
                )
            })?;
            explain(&snapshot, &ask)
        }),
    )
}

#[derive(Debug, Serialize)]
struct SpendRow {
    day: String,
    key: String,
    model: String,
    deployment: String,
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
            Date::parse(text, DAY).map_err(|_| {
                GatewayError::bad_request(
                    format!("`{name}` must be a date as YYYY-MM-DD, such as 2026-11-28"),
                    Some(name.into()),
                )
            })
        })
        .transpose()
}

/// `GET /admin/spend?key=NAME&from=YYYY-MM-DD&to=YYYY-MM-DD`: spend per
/// day, key, model and deployment from the ledger (all filters optional,
/// dates inclusive, UTC).
pub async fn spend(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    uri: Uri,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let snapshot = app.snapshot.load_full();
    answer(
        auth::authenticate_admin(&snapshot, &headers, uri.path()).and_then(|()| {
            if let Some(unknown) = params
                .keys()
                .find(|k| !matches!(k.as_str(), "key" | "from" | "to"))
            {
                return Err(GatewayError::bad_request(
                    format!("unknown parameter `{unknown}`; use key, from and to"),
                    Some(unknown.clone()),
                ));
            }
            let (from, to) = (day(&params, "from")?, day(&params, "to")?);
            let key = params.get("key").cloned();
            let mut total = SpendTotal::default();
            let mut total_nano = 0u64;
            let rows = app
                .ledger
                .rows(key.as_deref(), from, to)
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
                        requests: t.requests,
                        input_tokens: t.input_tokens,
                        output_tokens: t.output_tokens,
                        cost_usd: t.cost_nano_usd as f64 / 1e9,
                    }
                })
                .collect();
            total.cost_usd = total_nano as f64 / 1e9;
            Ok(Spend {
                key,
                from: params.get("from").cloned(),
                to: params.get("to").cloned(),
                rows,
                total,
            })
        }),
    )
}
