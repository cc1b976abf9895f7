//! One admission path: the live gateway and explain (`POST /admin/explain`
//! and `tollgate explain`) decide every request through the same function,
//! so for each key, region header, model and modality they agree on the
//! status and on the deployment chosen.

mod support;

use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;

/// Chat in the US and the EU; a multimodal Llama in both; text-only
/// deployments in both; one US deployment at one request a minute. Keys
/// fixed to the EU and to the US, and one that may choose its region.
fn config() -> Config {
    let sim = |name: &str, region: &str| {
        Backend::simulated(name)
            .set("region", region)
            .answers(0, 100_000, 2)
    };
    let both = |alias: &str, model: &str, vision: bool| {
        let deployment = |region: &str| {
            let d = Deployment::new(&format!("sim-{region}"), model)
                .set("name", format!("{alias}/{region}"));
            if vision {
                d.set("licence", "llama").multimodal(&["text", "image"])
            } else {
                d
            }
        };
        Model::new(alias)
            .deployment(deployment("us"))
            .deployment(deployment("eu"))
    };
    Config::new()
        .admin()
        .set("policy", "default_region", "us")
        .residency("eu", &["eu-west-1"])
        .residency("us", &["us-east-1"])
        .backend(sim("sim-us", "us-east-1"))
        .backend(sim("sim-eu", "eu-west-1"))
        .model(both("chat", "m", false))
        .model(both("vision", "llama-4-maverick", true))
        .model(both("text", "m", false))
        .model(
            Model::new("scarce").deployment(Deployment::named("scarce/us", "sim-us").set("rpm", 1)),
        )
        .key(Key::new("eu-team").set("region", "eu"))
        .key(
            Key::new("us-team")
                .models(&["chat", "text"])
                .set("region", "us"),
        )
        .key(Key::new("roamer").set("region_header", true))
        .key(Key::new("eu-capitals").set("region", "EU"))
}

struct Case {
    key: &'static str,
    region: Option<&'static str>,
    model: &'static str,
    image: bool,
    status: u16,
    /// The backend that serves it, when it is served.
    backend: Option<&'static str>,
}

const fn case(
    key: &'static str,
    region: Option<&'static str>,
    model: &'static str,
    image: bool,
    status: u16,
    backend: Option<&'static str>,
) -> Case {
    Case {
        key,
        region,
        model,
        image,
        status,
        backend,
    }
}

const CASES: &[Case] = &[
    // A key's own region, named or not.
    case("eu-team", None, "chat", false, 200, Some("sim-eu")),
    case("eu-team", Some("eu"), "chat", false, 200, Some("sim-eu")),
    // A key fixed to a region may not choose another.
    case("eu-team", Some("us"), "chat", false, 403, None),
    case("us-team", Some("eu"), "chat", false, 403, None),
    // A model the key may not use; a model nobody has.
    case("us-team", None, "vision", false, 403, None),
    case("us-team", None, "nope", false, 404, None),
    // A key that may choose, and the default region when it does not.
    case("roamer", Some("eu"), "chat", false, 200, Some("sim-eu")),
    case("roamer", None, "chat", false, 200, Some("sim-us")),
    case("roamer", Some("us"), "chat", false, 200, Some("sim-us")),
    // Multimodal Llama: never for the EU, with or without an image.
    case("roamer", Some("eu"), "vision", false, 451, None),
    case("roamer", Some("eu"), "vision", true, 451, None),
    case("eu-team", None, "vision", true, 451, None),
    case("roamer", None, "vision", true, 200, Some("sim-us")),
    // An image to text-only deployments.
    case("roamer", Some("us"), "text", true, 451, None),
    case("us-team", None, "text", false, 200, Some("sim-us")),
    // Residency leaves the EU nothing in "scarce"; its one US deployment
    // is at its quota after the warm-up requests.
    case("eu-team", None, "scarce", false, 451, None),
    case("roamer", Some("us"), "scarce", false, 429, None),
    // Regions are compared without regard to case: in the header, and in
    // the config.
    case("roamer", Some("EU"), "vision", false, 451, None),
    case("roamer", Some("Eu"), "chat", false, 200, Some("sim-eu")),
    case("eu-team", Some("EU"), "chat", false, 200, Some("sim-eu")),
    case("eu-capitals", None, "vision", false, 451, None),
    case(
        "eu-capitals",
        Some("eu"),
        "chat",
        false,
        200,
        Some("sim-eu"),
    ),
    // A region header that is no region name.
    case("roamer", Some("eu west"), "chat", false, 400, None),
];

fn request(model: &str, image: bool) -> Value {
    let content = if image {
        json!([{"type": "text", "text": "what is this?"},
               {"type": "image_url", "image_url": {"url": png(640, 480)}}])
    } else {
        json!("hello")
    };
    json!({"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": content}]})
}

/// What explain says: the plan's status and the chosen deployment's
/// backend, or the HTTP status of the error it answers.
async fn explained(gateway: &Gateway, case: &Case) -> (u16, Option<String>) {
    let mut ask = json!({"request": request(case.model, case.image), "key": case.key});
    if let Some(region) = case.region {
        ask["region"] = json!(region);
    }
    let response = gateway.ask_explain(&ask).await;
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    if status != 200 {
        return (status, None);
    }
    let chosen = body["chosen"].as_str().map(|name| {
        candidate(&body, name)["backend"]
            .as_str()
            .unwrap()
            .to_owned()
    });
    (body["status"].as_u64().unwrap() as u16, chosen)
}

/// What the gateway does: the status, and the backend that answered.
async fn served(gateway: &Gateway, case: &Case) -> (u16, Option<String>) {
    let secret = format!("{}-secret", case.key);
    let mut post = gateway
        .post("/v1/chat/completions")
        .bearer_auth(secret)
        .json(&request(case.model, case.image));
    if let Some(region) = case.region {
        post = post.header("x-tollgate-region", region);
    }
    let response = post.send().await.unwrap();
    let status = response.status().as_u16();
    let backend = (status == 200).then(|| served_by(&response).0);
    (status, backend)
}

#[tokio::test]
async fn the_gateway_and_explain_decide_every_case_alike() {
    let gateway = start(&config()).await;
    // The one request a minute of "scarce/us", then one refused at its
    // quota, after which plans drop it until the minute is over.
    let warm_up = Case {
        region: Some("us"),
        ..case("roamer", None, "scarce", false, 200, Some("sim-us"))
    };
    assert_eq!(
        served(&gateway, &warm_up).await,
        (200, Some("sim-us".into()))
    );
    assert_eq!(served(&gateway, &warm_up).await, (429, None));
    for case in CASES {
        let what = format!(
            "key {} region {:?} model {} image {}",
            case.key, case.region, case.model, case.image
        );
        let want = (case.status, case.backend.map(str::to_owned));
        // Explain first: it changes no live state.
        assert_eq!(explained(&gateway, case).await, want, "explain: {what}");
        assert_eq!(served(&gateway, case).await, want, "served: {what}");
    }
}

/// `tollgate explain` on the same config: the region a key may not
/// choose is refused as the gateway refuses it, not planned.
#[test]
fn the_explain_command_refuses_a_region_the_key_may_not_choose() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    std::fs::write(&config, self::config().to_toml()).unwrap();
    let request = dir.path().join("request.json");
    std::fs::write(&request, request_body()).unwrap();
    let explain = |region: &str| {
        std::process::Command::new(support::process::binary())
            .args(["explain", "--config"])
            .arg(&config)
            .arg("--request")
            .arg(&request)
            .args(["--key", "eu-team", "--region", region])
            .env("ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(["EU_TEAM", "US_TEAM", "ROAMER"].map(|k| (format!("KEY_{k}"), k)))
            .output()
            .unwrap()
    };
    let refused = explain("us");
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("may not choose region \"us\""), "{stderr}");
    let planned = explain("eu");
    assert!(
        planned.status.success(),
        "{}",
        String::from_utf8_lossy(&planned.stderr)
    );
    let plan: Value = serde_json::from_slice(&planned.stdout).unwrap();
    assert_eq!(plan["status"], 200);
    assert_eq!(plan["chosen"], "chat/eu");
}

fn request_body() -> String {
    request("chat", false).to_string()
}

#[tokio::test]
async fn a_request_no_context_window_holds_is_a_400_naming_what_to_shorten() {
    let gateway = start(&config()).await;
    // Every deployment holds 8,192 tokens.
    let long_prompt = json!({"model": "chat", "messages": user(&"word ".repeat(8_000))});
    let long_output = json!({"model": "vision", "max_tokens": 200_000, "messages": user("hi")});
    for body in [long_prompt, long_output] {
        let response = gateway.chat_as("roamer-secret", body.clone()).await;
        assert_eq!(response.status(), 400, "{body}");
        let error = error_of(response).await;
        assert_eq!(error["code"], "context_length_exceeded");
        assert_eq!(error["type"], "invalid_request_error");
        assert_eq!(error["param"], "messages");
        assert!(
            message(&error).starts_with("This model's maximum context length is 8192 tokens."),
            "{error}"
        );
        // Explain says the same, before any policy: not a 451.
        let explained = gateway
            .ask_explain(&json!({"request": body, "key": "roamer", "region": "eu"}))
            .await;
        assert_eq!(explained.status(), 400);
    }
    let response = gateway
        .post("/v1/completions")
        .bearer_auth("roamer-secret")
        .json(&json!({"model": "chat", "prompt": "hi", "max_tokens": 9_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "prompt");
    assert!(
        message(&error).contains("(1 in the prompt, 9000 in the completion)"),
        "{error}"
    );
}

/// `GET /v1/models` as a key sees it, with a region header or none.
async fn listed(gateway: &Gateway, key: &str, region: Option<&str>) -> Vec<String> {
    let mut get = gateway
        .http
        .get(format!("{}/v1/models", gateway.base))
        .bearer_auth(format!("{key}-secret"));
    if let Some(region) = region {
        get = get.header("x-tollgate-region", region);
    }
    let body: Value = get.send().await.unwrap().json().await.unwrap();
    body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn models_lists_and_retrieves_only_what_the_caller_can_be_served_in_its_region() {
    let gateway = start(&config()).await;
    // In the EU: no multimodal Llama, and nothing "scarce" keeps there.
    assert_eq!(listed(&gateway, "eu-team", None).await, ["chat", "text"]);
    assert_eq!(
        listed(&gateway, "roamer", Some("eu")).await,
        ["chat", "text"]
    );
    assert_eq!(
        listed(&gateway, "roamer", None).await,
        ["chat", "vision", "text", "scarce"]
    );
    assert_eq!(listed(&gateway, "us-team", None).await, ["chat", "text"]);

    let retrieve = |key: &'static str, id: &'static str| {
        gateway
            .http
            .get(format!("{}/v1/models/{id}", gateway.base))
            .bearer_auth(format!("{key}-secret"))
            .send()
    };
    let response = retrieve("roamer", "vision").await.unwrap();
    assert_eq!(response.status(), 200);
    let model: Value = response.json().await.unwrap();
    assert_eq!(model["id"], "vision");
    assert_eq!(model["object"], "model");
    assert!(model["created"].is_u64() && model["owned_by"].is_string());
    for (key, id) in [
        ("eu-team", "vision"),
        ("us-team", "vision"),
        ("roamer", "nope"),
    ] {
        let response = retrieve(key, id).await.unwrap();
        assert_eq!(response.status(), 404, "{key} {id}");
        assert_eq!(error_of(response).await["code"], "model_not_found");
    }
    let response = gateway.get("/v1/models/chat", None).await;
    assert_eq!(response.status(), 401, "a key is needed, as for the list");
    // An id that decodes to bytes that are not UTF-8: an OpenAI error too.
    let response = retrieve("roamer", "%ff%00").await.unwrap();
    assert_eq!(response.status(), 400);
    let error = error_of(response).await;
    assert_eq!(error["param"], "model");
    assert!(message(&error).contains("not UTF-8"), "{error}");
    let response = gateway.get("/v1/models/%ff", None).await;
    assert_eq!(response.status(), 401, "the key is checked first");
}
