//! `tollgate simulate` against figures computed by hand: a per-token API,
//! a self-hosted pool with fixed costs, spillover above its capacity, the
//! boundaries (no traffic, traffic above every capacity), policy as for
//! the profile's region, and the worked example of docs/economics.md as
//! the binary prints it.

mod support;

use serde_json::{Value, json};
use support::process::run_ok;
use tollgate::config::{Config, Secrets, parse_with};
use tollgate::economics::{Profile, simulate};

/// A pool of 2 GPUs at $2.50 an hour processing 2,000 tokens a second
/// flat out; two APIs: `api-a` at $0.50 in / $1.50 out per Mtok (a
/// request of 1,000 + 200 tokens costs $0.0008), `api-b` at $0.40 / $1.00
/// ($0.0006); and `api-c` at $10 / $10 ($0.012).
const CONFIG: &str = r#"
[[backends]]
name = "pool"
kind = "vllm"
base_url = "http://pool.internal:8000/v1"
gpu_hour_usd = 2.50
gpus = 2
throughput_tokens_per_second = 2000

[[backends]]
name = "api"
kind = "openai"
base_url = "https://api.example.com/v1"
api_key_env = "API_KEY"

[[models]]
alias = "m"
strategy = "spillover"
[models.spillover]
high_load = 0.5

[[models.deployments]]
backend = "pool"
model = "m"
context_window = 8192
licence = "llama"

[[models.deployments]]
name = "api-a"
backend = "api"
model = "m"
input_usd_per_mtok = 0.50
output_usd_per_mtok = 1.50
context_window = 8192
licence = "llama"

[[models.deployments]]
name = "api-b"
backend = "api"
model = "m"
input_usd_per_mtok = 0.40
output_usd_per_mtok = 1.00
context_window = 8192
licence = "llama"

[[models]]
alias = "peaked"
strategy = "spillover"
[models.spillover]
high_load = 0.85

[[models.deployments]]
backend = "pool"
model = "m"
context_window = 8192

[[models.deployments]]
name = "peaked/api-b"
backend = "api"
model = "m"
input_usd_per_mtok = 0.40
output_usd_per_mtok = 1.00
context_window = 8192

[[models.deployments]]
name = "peaked/api-c"
backend = "api"
model = "m"
input_usd_per_mtok = 10
output_usd_per_mtok = 10
context_window = 8192

[[models]]
alias = "pool-only"
strategy = "spillover"
[models.spillover]
high_load = 0.5

[[models.deployments]]
backend = "pool"
model = "m"
context_window = 8192

[[models]]
alias = "vision"

[[models.deployments]]
name = "vision/api"
backend = "api"
model = "llama-4"
input_usd_per_mtok = 0.25
output_usd_per_mtok = 0.75
context_window = 8192
modalities = ["text", "image"]
multimodal = true
licence = "llama"
"#;

/// $600 a month of fixed costs on the pool: $20 a day.
const FIXED: &str = r#"
[[fixed]]
backend = "pool"
monthly_usd = 600
label = "on call"
"#;

fn config() -> Config {
    parse_with(CONFIG, Secrets::Unread).expect("the test config is valid")
}

/// The simulation of one alias's traffic, as JSON.
fn run(traffic: &str) -> Value {
    let config = config();
    let profile = Profile::parse(
        &format!("days = 30\n{FIXED}\n[[traffic]]\n{traffic}"),
        &config,
    )
    .expect("the test profile is valid");
    serde_json::to_value(simulate(&config, &profile)).unwrap()
}

fn deployment<'a>(simulation: &'a Value, name: &str) -> &'a Value {
    simulation["deployments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["deployment"] == name)
        .unwrap_or_else(|| panic!("no {name} in {simulation:#}"))
}

#[test]
fn per_token_and_self_hosted_deployments_cost_what_is_computed_by_hand() {
    let s =
        run("alias = \"m\"\nrequests_per_day = 100000\ninput_tokens = 1000\noutput_tokens = 200");
    // 100,000 × $0.0008 = $80 a day, $2,400 over 30 days; 1.2e8 tokens
    // a day, so $80 / 120 Mtok = $0.666667 a Mtok.
    let a = deployment(&s, "api-a");
    assert_eq!(a["kind"], "per_token");
    assert_eq!(
        (&a["daily_usd"], &a["monthly_usd"]),
        (&json!(80.0), &json!(2400.0))
    );
    assert_eq!(a["effective_usd_per_mtok"], json!(0.666667));
    let b = deployment(&s, "api-b");
    assert_eq!(
        (&b["daily_usd"], &b["monthly_usd"]),
        (&json!(60.0), &json!(1800.0))
    );
    // 2 GPUs × $2.50 × 24 h = $120 a day, plus $600 / 30 = $20: $140, and
    // $4,200 a month over 3,600 Mtok: $1.166667 a Mtok.
    let pool = deployment(&s, "m/pool");
    assert_eq!(pool["kind"], "self_hosted");
    assert_eq!(
        (&pool["daily_usd"], &pool["monthly_usd"]),
        (&json!(140.0), &json!(4200.0))
    );
    assert_eq!(pool["effective_usd_per_mtok"], json!(1.166667));
    // 1,388.9 tokens a second over 2,000: 69.44% busy. A flat day's peak
    // is its mean; at 70% a GPU takes 700 a second: 2 GPUs.
    assert_eq!(pool["utilisation"], json!(0.6944));
    assert_eq!(pool["gpus_needed"], 2);
    assert_eq!(
        pool["fixed"],
        json!([{"label": "on call", "monthly_usd": 600.0}])
    );
    let alias = &s["aliases"][0];
    assert_eq!(
        alias["all_api"],
        json!({"deployment": "api-b", "daily_usd": 60.0, "monthly_usd": 1800.0})
    );
    assert_eq!(
        alias["all_self_hosted"],
        json!({"deployment": "m/pool", "gpus": 2, "daily_usd": 140.0, "monthly_usd": 4200.0})
    );
}

#[test]
fn spillover_sends_what_is_above_the_pools_capacity_to_the_cheapest_api() {
    // A flat day: the pool takes 2,000 × 0.5 (high_load) × 86,400 =
    // 86.4 M tokens a day of the 120 M; 33.6 M spill to api-b at $0.0006
    // per 1,200 tokens: $16.80 a day. With the pool's $140: $156.80.
    let s =
        run("alias = \"m\"\nrequests_per_day = 100000\ninput_tokens = 1000\noutput_tokens = 200");
    let configured = &s["aliases"][0]["configured"];
    assert_eq!(
        *configured,
        json!({
            "daily_usd": 156.8, "monthly_usd": 4704.0,
            "spilled_tokens_per_day": 33_600_000, "spilled_to": "api-b",
            "unserved_tokens_per_day": 0
        })
    );
    // Peak 1.5× the mean: hours rise from 60 M to 180 M a day-rate. At
    // high_load 0.85 the pool takes 146.88 M; above it a triangle of
    // (180 − 146.88)² / (2 × 120) M = 4,570,560 tokens a day, at $0.0006
    // per 1,200: $2.28528 a day. $140 + $2.28528 = $142.29 a day, and
    // $4,200 + 30 × $2.28528 = $4,268.56 a month.
    let s = run(
        "alias = \"peaked\"\nrequests_per_day = 100000\ninput_tokens = 1000\noutput_tokens = 200\npeak_to_mean = 1.5",
    );
    let alias = &s["aliases"][0];
    assert_eq!(alias["configured"]["spilled_tokens_per_day"], 4_570_560);
    assert_eq!(alias["configured"]["spilled_to"], "peaked/api-b");
    assert_eq!(alias["configured"]["daily_usd"], json!(142.29));
    assert_eq!(alias["configured"]["monthly_usd"], json!(4268.56));
    // The peak, 2,083 tokens a second, needs 3 GPUs at 70%: all
    // self-hosted pays 3 × $2.50 × 24 + $20 = $200 a day.
    assert_eq!(deployment(&s, "peaked/pool")["gpus_needed"], 3);
    assert_eq!(
        alias["all_self_hosted"],
        json!({"deployment": "peaked/pool", "gpus": 3, "daily_usd": 200.0, "monthly_usd": 6000.0})
    );
    // api-c costs $0.012 a request: the 2-GPU pool's $4,200 a month is
    // cheaper from 4,200 / (30 × 0.012) = 11,666.7 requests a day on, and
    // 2 GPUs serve 67,200 a day at that peak. Against api-b's $0.0006 a
    // GPU's $1,800 a month buys 33,600 requests a day: never.
    assert_eq!(
        alias["break_even"],
        json!([
            {"deployment": "peaked/api-b", "requests_per_day": null, "cheaper_between": null},
            {"deployment": "peaked/api-c", "requests_per_day": 11_667, "cheaper_between": null}
        ])
    );
}

#[test]
fn no_traffic_costs_the_pool_and_nothing_per_token() {
    let s = run("alias = \"m\"\nrequests_per_day = 0\ninput_tokens = 1000\noutput_tokens = 200");
    let a = deployment(&s, "api-a");
    assert_eq!(
        (&a["daily_usd"], &a["effective_usd_per_mtok"]),
        (&json!(0.0), &Value::Null)
    );
    let pool = deployment(&s, "m/pool");
    assert_eq!(
        (
            &pool["daily_usd"],
            &pool["gpus_needed"],
            &pool["utilisation"]
        ),
        (&json!(140.0), &json!(0), &json!(0.0))
    );
    let configured = &s["aliases"][0]["configured"];
    assert_eq!(
        (
            &configured["daily_usd"],
            &configured["spilled_tokens_per_day"]
        ),
        (&json!(140.0), &json!(0))
    );
}

#[test]
fn traffic_above_every_capacity_is_unserved_without_an_api() {
    // 10 M requests of 1,200 tokens: 12 G tokens a day against the pool's
    // 86.4 M at high_load 0.5, flat: 11,913.6 M unserved.
    let s = run(
        "alias = \"pool-only\"\nrequests_per_day = 10000000\ninput_tokens = 1000\noutput_tokens = 200",
    );
    let alias = &s["aliases"][0];
    assert_eq!(
        alias["configured"]["unserved_tokens_per_day"],
        11_913_600_000u64
    );
    assert_eq!(alias["configured"]["spilled_to"], Value::Null);
    assert_eq!(alias["configured"]["daily_usd"], json!(140.0));
    assert_eq!(alias["all_api"], Value::Null);
    // 138,889 tokens a second over 700 a GPU: 199 GPUs, at $60 a day each.
    assert_eq!(deployment(&s, "pool-only/pool")["gpus_needed"], 199);
    assert_eq!(
        alias["all_self_hosted"]["daily_usd"],
        json!(199.0 * 60.0 + 20.0)
    );
    // With an API, all of it above the pool goes there instead.
    let s =
        run("alias = \"m\"\nrequests_per_day = 10000000\ninput_tokens = 1000\noutput_tokens = 200");
    let configured = &s["aliases"][0]["configured"];
    assert_eq!(configured["spilled_tokens_per_day"], 11_913_600_000u64);
    assert_eq!(configured["unserved_tokens_per_day"], 0);
    // 11,913.6 M tokens at $0.0006 per 1,200 = $5,956.80, plus $140.
    assert_eq!(configured["daily_usd"], json!(6096.8));
}

#[test]
fn policy_applies_as_for_a_request_from_the_profiles_region() {
    let vision =
        "alias = \"vision\"\nrequests_per_day = 1000\ninput_tokens = 1000\noutput_tokens = 200";
    let s = run(&format!("{vision}\nregion = \"EU\""));
    let alias = &s["aliases"][0];
    assert_eq!(alias["region"], "eu");
    assert_eq!(alias["refused"][0]["deployment"], "vision/api");
    assert_eq!(alias["refused"][0]["rule"], "llama_eu_multimodal");
    assert_eq!(alias["all_api"], Value::Null);
    assert!(s["deployments"].as_array().unwrap().is_empty());
    let s = run(&format!("{vision}\nregion = \"us\""));
    // 1,000 × (1,000 × $0.25 + 200 × $0.75) / 1e6 = $0.40 a day.
    assert_eq!(s["aliases"][0]["all_api"]["daily_usd"], json!(0.4));
}

#[test]
fn a_profile_with_mistakes_is_refused_with_every_problem_named() {
    let config = config();
    let problems = Profile::parse(
        "days = 0\nmax_utilisation = 1.5\n[[traffic]]\nalias = \"nope\"\nrequests_per_day = 1\ninput_tokens = 1\noutput_tokens = 1\npeak_to_mean = 0.5\n[[fixed]]\nbackend = \"api\"\nmonthly_usd = 1\nlabel = \"\"",
        &config,
    )
    .unwrap_err();
    let text = problems.join("\n");
    for expected in [
        "days: must be between 1 and 366",
        "max_utilisation: must be more than 0 and at most 1",
        "traffic[0].alias: no model \"nope\" in the config",
        "traffic[0].peak_to_mean: must be between 1",
        "fixed[0].backend: backend \"api\" is priced per token",
        "fixed[0].label: say what the cost is",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
    }
    let unknown = Profile::parse("dayz = 3", &config).unwrap_err();
    assert!(unknown[0].contains("unknown field `dayz`"), "{unknown:?}");
    // Named by its path, as a config's problems are.
    let unknown =
        Profile::parse("[[traffic]]\nalias = \"chat\"\ncolour = 1\n", &config).unwrap_err();
    assert!(
        unknown[0].starts_with("traffic[0].colour: unknown field"),
        "{unknown:?}"
    );
}

/// docs/economics.md shows `simulate` on the example config and profile
/// exactly as the binary prints it.
#[test]
fn the_worked_example_in_the_docs_is_what_simulate_prints() {
    let printed = run_ok(&[
        "simulate",
        "--config",
        "examples/economics/tollgate.toml",
        "--profile",
        "examples/economics/profile.toml",
    ]);
    let root = env!("CARGO_MANIFEST_DIR");
    let docs = std::fs::read_to_string(format!("{root}/docs/economics.md")).unwrap();
    assert!(
        docs.contains(&format!("```text\n{printed}```")),
        "docs/economics.md should show, in a ```text block, exactly:\n{printed}"
    );
}
