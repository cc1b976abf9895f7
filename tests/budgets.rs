//! A budget is never overrun, however many requests run at once and
//! however long their answers: admission reserves each request's worst
//! case, the gateway sets `max_tokens` upstream to what the reservation
//! pays for when the client set none, and a stream that reaches its
//! reservation is ended as if at its length limit.

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{Value, json};
use support::config::{Backend, Config, Deployment, Key, Model};
use support::gateway::*;
use support::mock::{self, MockServer, MockUpstream};
use support::vision::Vision;

/// $1 per Mtok in, $10 per Mtok out: an output token is 10,000
/// nano-dollars, and "hi" (estimated at 5 prompt tokens) costs 5,000.
const PRICE: (f64, f64) = (1.0, 10.0);
const CONTEXT_WINDOW: u64 = 8192;
/// The output tokens $0.005 pays for beside the most "hi" can be as a
/// chat prompt, which a budget reserves: 82 tokens, a chat template's 64,
/// a message's 16 and its 2 bytes (`metering::estimate`). (5,000,000 −
/// 82,000) / 10,000.
const AFFORDED: u64 = 491;
/// The same, with one tool, `search`, offered: 82, the 192 a template adds
/// to offer tools, and twice the tool's 81 bytes of JSON, 436 in all.
/// (5,000,000 − 436,000) / 10,000.
const AFFORDED_WITH_A_TOOL: u64 = 456;

fn config(upstream: &MockServer, daily_usd: f64) -> Config {
    config_of("openai", upstream, daily_usd)
}

/// `config`, on a backend of `kind`.
fn config_of(kind: &str, upstream: &MockServer, daily_usd: f64) -> Config {
    config_in(kind, CONTEXT_WINDOW, upstream, daily_usd)
}

/// `config_of`, with a context window of `window` tokens.
fn config_in(kind: &str, window: u64, upstream: &MockServer, daily_usd: f64) -> Config {
    // TGI's base URL is its root; the others' ends at /v1.
    let base = match kind {
        "tgi" => upstream.base_url(),
        _ => url(upstream),
    };
    Config::new()
        .backend(Backend::upstream("api", kind, &base))
        .model(
            Model::new("chat").deployment(
                Deployment::new("api", "m")
                    .price(PRICE.0, PRICE.1)
                    .set("context_window", window as i64)
                    .set("tools", true)
                    .set("modalities", vec!["text", "image", "audio", "video"])
                    .set("multimodal", true),
            ),
        )
        .key(Key::new("team").set("budget_daily_usd", daily_usd))
        .admin()
}

async fn spent(gateway: &Gateway) -> f64 {
    gateway.spend("?key=team").await["total"]["cost_usd"]
        .as_f64()
        .unwrap()
}

/// Waves of `concurrency` requests at once, none with `max_tokens`, each
/// asking for `answers` answers (`n`), and half of them streamed, against
/// answers of 2,000 tokens ($0.02 each) and a $0.10 daily budget, until a
/// wave has none served. Returns the requests served and how far spend
/// passed the budget.
async fn overrun_at(concurrency: usize, answers: usize) -> (usize, f64) {
    let upstream = MockUpstream::openai().answers_of(2_000);
    overrun_of(
        upstream,
        concurrency,
        |i| json!({"model": "chat", "messages": user("hi"), "stream": i % 2 == 0, "n": answers}),
    )
    .await
}

/// `overrun_at`, with `upstream` answering the requests `body` makes.
async fn overrun_of(
    upstream: MockUpstream,
    concurrency: usize,
    body: impl Fn(usize) -> Value,
) -> (usize, f64) {
    overrun_on("openai", CONTEXT_WINDOW, upstream, concurrency, body).await
}

/// `overrun_of`, on a backend of `kind` whose model holds `window` tokens.
async fn overrun_on(
    kind: &str,
    window: u64,
    upstream: MockUpstream,
    concurrency: usize,
    body: impl Fn(usize) -> Value,
) -> (usize, f64) {
    let upstream = upstream
        .first_byte_after(Duration::from_millis(20))
        .record(false)
        .start()
        .await;
    let budget = 0.10;
    let gateway = start(&config_in(kind, window, &upstream, budget)).await;
    let request = |i: usize| {
        let gateway = &gateway;
        let body = body(i);
        async move {
            let response = gateway.chat_as("team-secret", body).await;
            let status = response.status().as_u16();
            // Read to the end: a stream is metered when it ends.
            let body = response.bytes().await.unwrap_or_default();
            let code = serde_json::from_slice::<Value>(&body)
                .ok()
                .map(|b| b["error"]["code"].clone());
            (status, code.and_then(|c| c.as_str().map(str::to_owned)))
        }
    };
    let mut served = 0;
    for wave in 0.. {
        let answers = join_all((0..concurrency).map(request)).await;
        let ok = answers.iter().filter(|(s, _)| *s == 200).count();
        let refused: Vec<&str> = answers
            .iter()
            .filter(|(s, _)| *s == 429)
            .filter_map(|(_, code)| code.as_deref())
            .collect();
        assert_eq!(
            ok + refused.len(),
            concurrency,
            "every request is served or refused: {answers:?}"
        );
        served += ok;
        if ok == 0 {
            // The budget is spent: final.
            assert!(
                refused.iter().all(|&c| c == "insufficient_quota"),
                "{refused:?}"
            );
            break;
        }
        if wave == 0 {
            // A fresh budget held by the requests in flight: retry.
            assert!(refused.iter().all(|&c| c == "budget_held"), "{refused:?}");
        }
        assert!(wave < 30, "the budget is spent within 30 waves");
        // Streams are recorded by a task of their own just after they end.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let spent = spent(&gateway).await;
    eprintln!("waves of {concurrency} requests: {served} served, ${spent:.6} spent of ${budget}");
    // Up to what is less than a request's least cost (its prompt and a
    // token): a few thousandths for the longest prompts here.
    assert!(
        spent > budget * 0.95,
        "the load used the budget up: ${spent}"
    );
    (served, spent - budget)
}

/// The most one request can cost here: a context window of output.
const ONE_REQUEST_MAX: f64 = CONTEXT_WINDOW as f64 * PRICE.1 / 1e6;

#[tokio::test]
async fn a_budget_holds_with_100_requests_at_once_and_long_answers() {
    let (_, overrun) = overrun_at(100, 1).await;
    assert!(overrun <= ONE_REQUEST_MAX, "overrun ${overrun}");
    // Not at all: the upstream counts 11 prompt tokens where the gateway
    // estimated 5, within the 82 reserved for them.
    assert!(overrun <= 0.0, "overrun ${overrun}");
}

/// A client that sends its next request once it has read the last one's
/// answer never finds that answer still reserved: a request's cost is in
/// the ledger and its reservation freed before its last bytes go out
/// (the order itself is proven where the meter and the stream are tested).
/// Each request reserves $0.010082 (the most "hi" can be, 82 tokens, and
/// 1,000 of output) of a $0.015 budget, which holds one reservation
/// beside what is spent and never two; each costs about $0.00002, so
/// about 240 requests in a row each find the one before settled or are
/// refused `budget_held`, until the budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_waits_for_each_answer_never_finds_it_still_reserved() {
    for stream in [false, true] {
        let upstream = MockUpstream::openai()
            .answers_of(1)
            .record(false)
            .start()
            .await;
        let budget = 0.015;
        let gateway = start(&config(&upstream, budget)).await;
        let body =
            json!({"model": "chat", "messages": user("hi"), "max_tokens": 1000, "stream": stream});
        let mut served = 0;
        let refused = loop {
            let response = gateway.chat_as("team-secret", body.clone()).await;
            let status = response.status().as_u16();
            let answer = response.text().await.unwrap();
            if status != 200 {
                break (status, answer);
            }
            served += 1;
        };
        let (status, answer) = refused;
        let error: Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(
            (status, error["error"]["code"].as_str()),
            (429, Some("insufficient_quota")),
            "stream: {stream}, after {served} requests: {answer}"
        );
        eprintln!("stream: {stream}: {served} served");
        assert!(served > 200, "stream: {stream}: {served} served");
        let spent = spent(&gateway).await;
        assert!(
            budget - spent < 0.010082 && spent <= budget,
            "stream: {stream}: ${spent} spent"
        );
    }
}

#[tokio::test]
async fn a_budget_holds_with_1000_requests_at_once_and_long_answers() {
    let (_, overrun) = overrun_at(1000, 1).await;
    assert!(overrun <= 0.0, "overrun ${overrun}");
}

/// An upstream generates, and bills, each of a request's `n` answers up to
/// its output limit.
#[tokio::test]
async fn a_budget_holds_when_each_request_asks_for_several_answers() {
    let (_, overrun) = overrun_at(100, 4).await;
    assert!(overrun <= 0.0, "overrun ${overrun}");
}

/// 100 streams at once, each a tool call of 3,000 tokens ($0.03) from an
/// upstream that ignores the limit it is sent: the requests admitted last
/// hold what is left of the $0.10, a third of a call, and are cut there.
#[tokio::test]
async fn a_budget_holds_with_100_streamed_tool_calls_past_their_limits() {
    let tools = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
    let upstream = MockUpstream::openai().answers_of_ignoring_max_tokens(3_000);
    let (_, overrun) = overrun_of(
        upstream,
        100,
        |_| json!({"model": "chat", "messages": user("hi"), "tools": tools, "stream": true}),
    )
    .await;
    assert!(overrun <= 0.0, "overrun ${overrun}");
}

/// Text can be written to take a token a byte: Llama 3 counts digits
/// between spaces one token each, where the gateway estimates 4 bytes a
/// token. Waves of 100 prompts of 3,999 such bytes (1,004 tokens
/// estimated, 4,034 counted), half of them streamed, from an upstream that
/// counts them as Llama 3.1 does, spend no more than the budget, answered
/// at length or asking for one token (where the prompt is all the cost):
/// a budget reserves the most a prompt can be.
#[tokio::test]
async fn a_budget_holds_with_100_prompts_written_to_take_a_token_a_byte() {
    let digits: Vec<String> = (0..2000).map(|i| (i % 10).to_string()).collect();
    let digits = digits.join(" ");
    for max_tokens in [None, Some(1)] {
        let upstream = MockUpstream::openai()
            .answers_of(2_000)
            .counts_a_token_a_byte();
        let (served, overrun) = overrun_of(upstream, 100, |i| {
            let mut body =
                json!({"model": "chat", "messages": user(&digits), "stream": i % 2 == 0});
            if let Some(max_tokens) = max_tokens {
                body["max_tokens"] = json!(max_tokens);
            }
            body
        })
        .await;
        assert!(served >= 3, "{max_tokens:?}: {served} served");
        assert!(overrun <= 0.0, "{max_tokens:?}: overrun ${overrun}");
    }
}

/// Waves of 100 streams at once from vLLM, each counted by vLLM's usage
/// so far in every chunk rather than by its text (words of 6 bytes a
/// token, 1.5 times what the estimate takes), from an upstream that
/// honours the limit it is sent and from one that ignores it: the budget
/// holds either way.
#[tokio::test]
async fn a_budget_holds_with_100_streams_at_once_counted_by_vllm() {
    for upstream in [
        MockUpstream::openai().answers_of(2_000),
        MockUpstream::openai().answers_of_ignoring_max_tokens(2_000),
    ] {
        let upstream = upstream.token_text("token ");
        let (served, overrun) = overrun_on(
            "vllm",
            CONTEXT_WINDOW,
            upstream,
            100,
            |_| json!({"model": "chat", "messages": user("hi"), "stream": true}),
        )
        .await;
        assert!(served >= 5, "{served} served");
        assert!(overrun <= 0.0, "overrun ${overrun}");
    }
}

/// An upstream that stops at the limit the gateway sent ends its stream
/// itself: the client gets its last chunk and usage, and the ledger its
/// count — 11 prompt tokens where the gateway estimated 5, within the 82
/// reserved for them.
#[tokio::test]
async fn a_stream_that_stops_at_the_limit_it_was_sent_ends_with_the_upstreams_usage() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    // $0.005 pays for the most the prompt can be and 491 output tokens.
    let gateway = start(&config(&upstream, 0.005)).await;
    let body = json!({"model": "chat", "messages": user("hi"), "stream": true,
                      "stream_options": {"include_usage": true}});
    let response = gateway.chat_as("team-secret", body).await;
    assert_eq!(response.status(), 200);
    let events = Events::new(response).rest().await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let usage = parse(&events[events.len() - 2])["usage"].clone();
    assert_eq!(
        (&usage["prompt_tokens"], &usage["completion_tokens"]),
        (&json!(11), &json!(AFFORDED)),
        "{usage}"
    );
    let finish = parse(&events[events.len() - 3]);
    assert_eq!(finish["choices"][0]["finish_reason"], "length", "{finish}");
    assert_eq!(
        upstream.single_request().json["max_completion_tokens"],
        AFFORDED
    );
    let spent = spent(&gateway).await;
    assert!((spent - 0.004921).abs() < 1e-9, "${spent}");
}

/// A budgeted stream from vLLM is metered by vLLM's own count, chunk by
/// chunk (`continuous_usage_stats`, which the gateway asks for and takes
/// out of the chunks of a client that did not): English words of 6 bytes
/// a token, past the 4 the gateway would estimate, reach the limit the
/// budget set, 491 tokens, and no sooner; an upstream that ignores it is
/// cut by its own count of prompt and output at exactly what the
/// reservation pays for, 11 and 498. A key without a budget, and a
/// backend of another kind, are not asked for it.
#[tokio::test]
async fn a_budgeted_stream_from_vllm_is_metered_by_its_own_count_of_each_chunk() {
    let ask = |running: bool| {
        let mut options = json!({"include_usage": true});
        if running {
            options["continuous_usage_stats"] = json!(true);
        }
        json!({"model": "chat", "messages": user("hi"), "stream": true, "stream_options": options})
    };
    for (ignores_limit, client_asks) in [(false, false), (false, true), (true, false)] {
        let upstream = if ignores_limit {
            MockUpstream::openai().answers_of_ignoring_max_tokens(2_000)
        } else {
            MockUpstream::openai().answers_of(2_000)
        };
        let upstream = upstream.token_text("token ").start().await;
        let case = format!("ignores its limit: {ignores_limit}, client asks: {client_asks}");
        let gateway = start(&config_of("vllm", &upstream, 0.005)).await;
        let response = gateway.chat_as("team-secret", ask(client_asks)).await;
        assert_eq!(response.status(), 200, "{case}");
        let events = Events::new(response).rest().await;
        let chunks: Vec<Value> = events[..events.len() - 1]
            .iter()
            .map(|e| parse(e))
            .collect();
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        let words = text.len() / 6;
        // 11,000 nano-dollars of prompt and 498 output tokens fit $0.005.
        let output = if ignores_limit {
            498
        } else {
            AFFORDED as usize
        };
        assert!(text == "token ".repeat(output), "{case}: {words} words");
        let with_usage = chunks.iter().filter(|c| c["usage"].is_object()).count();
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], output, "{case}: {usage}");
        // The role chunk, the text and the last with its finish.
        let expected = if client_asks { chunks.len() } else { 1 };
        assert_eq!(with_usage, expected, "{case}");
        let finish = &chunks[chunks.len() - 2]["choices"][0];
        assert_eq!(finish["finish_reason"], "length", "{case}: {finish}");
        let sent = upstream.single_request().json;
        assert_eq!(
            sent["stream_options"]["continuous_usage_stats"], true,
            "{case}"
        );
        let spent = spent(&gateway).await;
        let nano_usd = 11 * 1_000 + output * 10_000;
        let cost = nano_usd as f64 / 1e9;
        assert!((spent - cost).abs() < 1e-9, "{case}: ${spent}");
        // Only the upstream that ignores its limit is cut, by its count.
        let cuts = ignores_limit.then_some(1.0);
        assert_eq!(cut(&gateway, "upstream").await, cuts, "{case}");
        assert_eq!(cut(&gateway, "gateway").await, None, "{case}");
    }

    let upstream = MockUpstream::openai().answers_of(20).start().await;
    for (kind, key) in [("vllm", "free-secret"), ("openai", "team-secret")] {
        let config = config_of(kind, &upstream, 0.005).key(Key::new("free"));
        let gateway = start(&config).await;
        let response = gateway.chat_as(key, ask(false)).await;
        assert_eq!(response.status(), 200, "{kind}");
        Events::new(response).rest().await;
        let sent = upstream.requests().last().unwrap().json.clone();
        assert_eq!(
            sent["stream_options"],
            json!({"include_usage": true}),
            "{kind}, {key}"
        );
    }
}

/// A client that leaves a budgeted vLLM stream halfway is charged vLLM's
/// count of what was generated until then (11 prompt tokens, 50 of
/// output), not the gateway's estimate of it (75 for 50 words of 6 bytes).
#[tokio::test]
async fn a_client_that_leaves_a_budgeted_vllm_stream_is_charged_its_count() {
    let upstream = MockUpstream::openai()
        .answers_of(2_000)
        .token_text("token ")
        .hold_after(51)
        .start()
        .await;
    let gateway = start(&config_of("vllm", &upstream, 1.0)).await;
    let body = json!({"model": "chat", "messages": user("hi"), "stream": true});
    let response = gateway.chat_as("team-secret", body).await;
    assert_eq!(response.status(), 200);
    let mut events = Events::new(response);
    let mut words = 0;
    while words < 50 {
        let chunk = parse(&events.next().await.expect("the held stream goes on"));
        words += usize::from(chunk["choices"][0]["delta"]["content"] == "token ");
    }
    drop(events);
    let deadline = std::time::Instant::now() + WAIT;
    let total = loop {
        let total = gateway.spend("?key=team").await["total"].clone();
        if total["requests"] == 1 {
            break total;
        }
        assert!(std::time::Instant::now() < deadline, "never recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (&total["input_tokens"], &total["output_tokens"]),
        (&json!(11), &json!(50)),
        "{total}"
    );
}

/// 100 requests at once, each with three images of sizes from one tile
/// to the 16 a Llama 4 image takes at most (147 to 2,467 prompt tokens, as
/// a Llama 4 upstream counts them) and from 2 to 15,303 (as Qwen 2.5 VL
/// counts them: a 12-megapixel photo is six times what Llama 4 makes of
/// it). Each image is reserved as the most either can be, so the requests
/// admitted last are limited to what the budget has left, whichever model
/// serves them.
#[tokio::test]
async fn a_budget_holds_with_100_requests_of_images_at_once() {
    const SIZES: [(u32, u32); 6] = [
        (1344, 1344),
        (4000, 3000),
        (700, 300),
        (336, 336),
        (100, 5000),
        (1000, 700),
    ];
    // Answered at length, or asking for one token, where the images are
    // most of the cost.
    let cases = [Vision::Llama4, Vision::Qwen25Vl]
        .into_iter()
        .flat_map(|vision| [(vision, None), (vision, Some(1))]);
    for (vision, max_tokens) in cases {
        let upstream = MockUpstream::openai()
            .answers_of(2_000)
            .counts_images_as(vision);
        // Qwen 2.5 VL holds 32,768 tokens as vLLM serves it by default;
        // Llama 4, more.
        let (_, overrun) = overrun_on("openai", 32_768, upstream, 100, |i| {
            let image = |j: usize| {
                let (width, height) = SIZES[(i + j) % SIZES.len()];
                json!({"type": "image_url", "image_url": {"url": png(width, height)}})
            };
            let content =
                json!([{"type": "text", "text": "What differs?"}, image(0), image(1), image(2)]);
            let mut body =
                json!({"model": "chat", "messages": [{"role": "user", "content": content}]});
            if let Some(max_tokens) = max_tokens {
                body["max_tokens"] = json!(max_tokens);
            }
            body
        })
        .await;
        assert!(
            overrun <= 0.0,
            "{vision:?}, {max_tokens:?}: overrun ${overrun}"
        );
    }
}

/// 100 requests at once, each with two minutes of audio: 3,000 prompt
/// tokens as Qwen2-Audio counts them, where the estimate is 765 a clip.
/// The gateway cannot measure audio, so each reserves the deployment's
/// whole context window for its prompt, and the budget holds, answered at
/// length or asking for one token, where the audio is all the cost.
#[tokio::test]
async fn a_budget_holds_with_100_requests_of_audio_at_once() {
    use base64::Engine as _;
    let clip =
        base64::engine::general_purpose::STANDARD.encode(support::openai_mock::wav(120, 1000));
    for max_tokens in [None, Some(1)] {
        let upstream = MockUpstream::openai().answers_of(2_000);
        let (_, overrun) = overrun_on("openai", 4096, upstream, 100, |i| {
            let content = json!([
                {"type": "text", "text": "Transcribe this."},
                {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]);
            let mut body = json!({"model": "chat", "stream": i % 2 == 0,
                "messages": [{"role": "user", "content": content}]});
            if let Some(max_tokens) = max_tokens {
                body["max_tokens"] = json!(max_tokens);
            }
            body
        })
        .await;
        assert!(overrun <= 0.0, "{max_tokens:?}: overrun ${overrun}");
    }
}

/// vLLM takes a request's own settings for the model's processor: with
/// Qwen 2.5 VL's `max_pixels` raised by `mm_processor_kwargs`, an
/// 8000 × 6000 photo is 61,226 prompt tokens, where the processor's own
/// limit makes at most 16,386 of any image. Such an image is reserved as
/// the deployment's context window: a budget with less than that left
/// refuses it, and one with more is not overrun.
#[tokio::test]
async fn an_image_the_request_resizes_itself_is_reserved_as_the_context_window() {
    let upstream = MockUpstream::openai()
        .answers_of(10)
        .counts_images_as(Vision::Qwen25Vl)
        .start()
        .await;
    let image = json!({"type": "image_url", "image_url": {"url": png(8000, 6000)}});
    let body = json!({"model": "chat", "max_tokens": 1,
        "mm_processor_kwargs": {"max_pixels": 50_000_000},
        "messages": [{"role": "user", "content": [image]}]});
    // 65,536 tokens at $1 per Mtok: $0.065536.
    let gateway = start(&config_in("openai", 65_536, &upstream, 0.05)).await;
    let response = gateway.chat_as("team-secret", body.clone()).await;
    assert_eq!(response.status(), 429);
    assert_eq!(error_of(response).await["code"], "insufficient_quota");
    assert_eq!(upstream.hits(), 0);

    let gateway = start(&config_in("openai", 65_536, &upstream, 0.07)).await;
    assert_eq!(gateway.chat_as("team-secret", body).await.status(), 200);
    let prompt = upstream.single_request();
    assert_eq!(prompt.json["mm_processor_kwargs"]["max_pixels"], 50_000_000);
    let spent = spent(&gateway).await;
    assert!((0.0612..=0.07).contains(&spent), "${spent}");
}

/// A budget that cannot pay for a context window of prompt refuses a
/// request with audio, however short, and says why.
#[tokio::test]
async fn audio_needs_a_context_window_of_budget() {
    use base64::Engine as _;
    let upstream = MockUpstream::openai().answers_of(10).start().await;
    // 8,192 tokens at $1 per Mtok: $0.008192.
    let gateway = start(&config(&upstream, 0.008)).await;
    let clip = base64::engine::general_purpose::STANDARD.encode(support::openai_mock::wav(1, 1000));
    let content = json!([{"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}}]);
    let body = json!({"model": "chat", "max_tokens": 1, "messages": [{"role": "user", "content": content}]});
    let response = gateway.chat_as("team-secret", body.clone()).await;
    assert_eq!(response.status(), 429);
    let error = error_of(response).await;
    assert_eq!(error["code"], "insufficient_quota");
    let message = error["message"].as_str().unwrap();
    assert!(
        message.contains("a whole context window with audio, video or files"),
        "{message}"
    );
    assert_eq!(upstream.hits(), 0);

    let gateway = start(&config(&upstream, 0.009)).await;
    assert_eq!(gateway.chat_as("team-secret", body).await.status(), 200);
}

/// An image is reserved as its tiles whichever API it comes by: a
/// 1344 × 1344 PNG is 2,467 prompt tokens, and with the most a chat
/// template adds (64, and 16 for the message), $0.002547 of a $0.005
/// budget.
#[tokio::test]
async fn an_image_is_reserved_as_its_tiles_on_every_api() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let url = png(1344, 1344);
    let chat = json!({"model": "chat", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]});
    let responses = json!({"model": "chat", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": url}]}]});
    for (path, body) in [("/v1/chat/completions", chat), ("/v1/responses", responses)] {
        let gateway = start(&config(&upstream, 0.005)).await;
        let response = gateway.post_as("team-secret", path, body).await;
        assert_eq!(response.status(), 200, "{path}");
        // What is left pays for (5,000,000 − 2,547,000) / 10,000 tokens.
        let sent = upstream.requests().last().unwrap().json.clone();
        assert_eq!(sent["max_completion_tokens"], 245, "{path}: {sent:.200}");
    }
    // Messages take `max_tokens`: with the image, 246 do not fit.
    let gateway = start(&config(&upstream, 0.005)).await;
    let image =
        json!({"type": "base64", "media_type": "image/png", "data": png_base64(1344, 1344)});
    let messages = |max_tokens: u32| {
        json!({"model": "chat", "max_tokens": max_tokens, "messages": [{"role": "user", "content": [
            {"type": "image", "source": image}]}]})
    };
    let send = |body: Value| gateway.post_as("team-secret", "/v1/messages", body);
    assert_eq!(send(messages(246)).await.status(), 429);
    assert_eq!(send(messages(245)).await.status(), 200);
}

/// A video's tokens are as many as the frames the upstream samples, which
/// the request does not tell: it is reserved as the whole context window,
/// 8,192 tokens ($0.008192), the most any prompt there can be.
#[tokio::test]
async fn a_video_is_reserved_as_the_whole_context_window() {
    let video = |extra: Value| {
        let mut body = json!({"model": "chat", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what happens?"},
            {"type": "video_url", "video_url": {"url": "https://example.invalid/clip.mp4"}}]}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    // What is left of $0.01 pays for (10,000,000 − 8,192,000) / 10,000
    // output tokens, whole or streamed from an upstream that ignores it.
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let gateway = start(&config(&upstream, 0.01)).await;
    let response = gateway.chat_as("team-secret", video(json!({}))).await;
    assert_eq!(response.status(), 200);
    assert_eq!(upstream.single_request().json["max_completion_tokens"], 180);

    let upstream = MockUpstream::openai()
        .answers_of_ignoring_max_tokens(2_000)
        .start()
        .await;
    let gateway = start(&config(&upstream, 0.01)).await;
    let streamed = video(json!({"stream": true}));
    let response = gateway.chat_as("team-secret", streamed).await;
    assert_eq!(response.status(), 200);
    let events = Events::new(response).rest().await;
    let content = events
        .iter()
        .filter(|e| e.as_str() != "[DONE]")
        .filter(|e| parse(e)["choices"][0]["delta"]["content"] == "tok ")
        .count();
    assert_eq!(content, 180, "what the reservation pays for");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(spent(&gateway).await <= 0.01);

    // 200 output tokens and the window do not fit $0.01.
    let gateway = start(&config(&upstream, 0.01)).await;
    let response = gateway
        .chat_as("team-secret", video(json!({"max_tokens": 200})))
        .await;
    assert_eq!(response.status(), 429);
    assert_eq!(error_of(response).await["code"], "insufficient_quota");
}

#[tokio::test]
async fn several_answers_are_reserved_and_limited_each() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    // $0.005 pays for the prompt and 491 output tokens: 122 for each of 4.
    let gateway = start(&config(&upstream, 0.005)).await;
    let four = json!({"model": "chat", "messages": user("hi"), "n": 4});
    let response = gateway.chat_as("team-secret", four).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"].as_array().unwrap().len(), 4);
    assert_eq!(body["usage"]["completion_tokens"], 4 * 122);
    assert_eq!(upstream.single_request().json["max_completion_tokens"], 122);
    assert!(spent(&gateway).await <= 0.005);

    // The client's own limit is reserved for each answer: 300 fits the
    // budget once (the test above) but not four times.
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let gateway = start(&config(&upstream, 0.005)).await;
    let too_much = json!({"model": "chat", "messages": user("hi"), "n": 4, "max_tokens": 300});
    let response = gateway.chat_as("team-secret", too_much).await;
    assert_eq!(response.status(), 429);
    assert_eq!(error_of(response).await["code"], "insufficient_quota");
    assert_eq!(upstream.hits(), 0);
    let fits =
        json!({"model": "chat", "messages": user("hi"), "n": 4, "max_tokens": 100, "stream": true});
    let response = gateway.chat_as("team-secret", fits).await;
    assert_eq!(response.status(), 200);
    let events = Events::new(response).rest().await;
    let indices: std::collections::BTreeSet<u64> = events
        .iter()
        .filter(|e| *e != "[DONE]")
        .filter_map(|e| parse(e)["choices"][0]["index"].as_u64())
        .collect();
    assert_eq!(indices.len(), 4, "every answer streamed: {indices:?}");

    // Legacy completions generate `best_of` answers, billed, to return `n`.
    let response = gateway
        .post_as(
            "team-secret",
            "/v1/completions",
            json!({"model": "chat", "prompt": "Once", "n": 1, "best_of": 5, "max_tokens": 100}),
        )
        .await;
    assert_eq!(
        response.status(),
        429,
        "5 × 100 tokens do not fit what is left"
    );
}

#[tokio::test]
async fn a_batch_of_prompts_is_reserved_for_each() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let gateway = start(&config(&upstream, 0.005)).await;
    let complete = |max_tokens: u32| {
        let body =
            json!({"model": "chat", "prompt": ["a", "b", "c", "d"], "max_tokens": max_tokens});
        gateway.post_as("team-secret", "/v1/completions", body)
    };
    // 300 tokens fit the budget once, not for four prompts.
    let response = complete(300).await;
    assert_eq!(response.status(), 429);
    assert_eq!(error_of(response).await["code"], "insufficient_quota");
    let response = complete(100).await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["choices"].as_array().unwrap().len(), 4);
    assert_eq!(body["usage"]["completion_tokens"], 400);
    assert!(spent(&gateway).await <= 0.005);
}

#[tokio::test]
async fn a_count_of_answers_out_of_range_is_refused_before_any_upstream() {
    let upstream = MockUpstream::openai().start().await;
    let gateway = start(&config(&upstream, 1.0)).await;
    for n in [json!(0), json!(129), json!(-1), json!("2"), json!(1.5)] {
        let body = json!({"model": "chat", "messages": user("hi"), "n": n});
        let response = gateway.chat_as("team-secret", body).await;
        assert_eq!(response.status(), 400, "n = {n}");
        let error = error_of(response).await;
        assert_eq!(error["param"], "n");
        assert_eq!(
            error["message"],
            "`n` must be a whole number from 1 to 128, or left out for 1"
        );
    }
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn without_max_tokens_the_gateway_sets_what_the_budget_pays_for() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    // $0.005: 5,000,000 nano-dollars, 82,000 of them for the most the
    // prompt can be, the rest 491 output tokens at 10,000 each.
    let gateway = start(&config(&upstream, 0.005)).await;
    let response = gateway
        .chat_as(
            "team-secret",
            json!({"model": "chat", "messages": user("hi")}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], AFFORDED);
    // OpenAI's chat API names it `max_completion_tokens`.
    assert_eq!(
        upstream.single_request().json["max_completion_tokens"],
        AFFORDED
    );

    // The client's own limit is sent as it is, and reserved in full.
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let gateway = start(&config(&upstream, 0.005)).await;
    let asks_too_much = json!({"model": "chat", "messages": user("hi"), "max_tokens": 600});
    let response = gateway.chat_as("team-secret", asks_too_much).await;
    assert_eq!(
        response.status(),
        429,
        "600 tokens may cost more than $0.005"
    );
    let error = error_of(response).await;
    assert_eq!(error["code"], "insufficient_quota");
    let fits = json!({"model": "chat", "messages": user("hi"), "max_tokens": 300});
    assert_eq!(gateway.chat_as("team-secret", fits).await.status(), 200);
    assert_eq!(upstream.single_request().json["max_tokens"], 300);
}

#[tokio::test]
async fn legacy_completions_keep_their_default_of_16_tokens() {
    let upstream = MockUpstream::openai().answers_of(2_000).start().await;
    let gateway = start(&config(&upstream, 1.0)).await;
    let response = gateway
        .post_as(
            "team-secret",
            "/v1/completions",
            json!({"model": "chat", "prompt": "Once upon"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["usage"]["completion_tokens"], 16);
    assert_eq!(upstream.single_request().json["max_tokens"], 16);
}

/// The chunks before `[DONE]` of a chat stream of `body` whose upstream
/// ignores `max_tokens` and would generate 2,000 tokens, on a key with a
/// $0.005 daily budget; and the gateway, for what it spent.
async fn stream_past_its_reservation(body: Value) -> (Vec<Value>, Gateway) {
    let upstream = MockUpstream::openai().answers_of_ignoring_max_tokens(2_000);
    stream_from("openai", upstream, body).await
}

/// The chunks before `[DONE]` of a chat stream of `body` from `upstream`,
/// a backend of `kind`, on a key with a $0.005 daily budget; and the
/// gateway.
async fn stream_from(kind: &str, upstream: MockUpstream, body: Value) -> (Vec<Value>, Gateway) {
    let upstream = upstream.start().await;
    let gateway = start(&config_of(kind, &upstream, 0.005)).await;
    let response = gateway
        .post_as("team-secret", "/v1/chat/completions", body)
        .await;
    assert_eq!(response.status(), 200);
    let events = Events::new(response).rest().await;
    assert_eq!(events.last().unwrap(), "[DONE]");
    let chunks = events[..events.len() - 1]
        .iter()
        .map(|e| parse(e))
        .collect();
    (chunks, gateway)
}

#[tokio::test]
async fn a_stream_that_reaches_its_reservation_ends_at_its_length_limit() {
    let (chunks, gateway) = stream_past_its_reservation(
        json!({"model": "chat", "messages": user("hi"), "stream": true,
               "stream_options": {"include_usage": true}}),
    )
    .await;
    let content = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"] == "tok ")
        .count();
    assert_eq!(content, AFFORDED as usize, "what the reservation pays for");
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["id"], "chatcmpl-mock", "the stream's own identity");
    let usage = &chunks[chunks.len() - 1]["usage"];
    assert_eq!(usage["completion_tokens"], AFFORDED);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spent = spent(&gateway).await;
    assert!(spent <= 0.005, "spent ${spent}");
    assert!(spent > 0.0049, "spent ${spent}");
    assert_eq!(cut(&gateway, "gateway").await, Some(1.0));
}

/// Streams the gateway ended at their reservation, their output `counted`
/// by the upstream or estimated.
async fn cut(gateway: &Gateway, counted: &str) -> Option<f64> {
    let labels = [("alias", "chat"), ("backend", "api"), ("counted", counted)];
    let text = gateway.metrics().await;
    metric(&text, "tollgate_streams_cut_at_reservation_total", &labels)
}

/// Tokens of generated text denser than the 4 bytes the gateway
/// estimates: a Markdown table's rule rows (12.8 bytes a token to Llama 3
/// and 4), Thai (9.6 to Llama 4), deeply indented code (8.4), each a token
/// a chunk.
const DENSE_TOKENS: [&str; 3] = ["|------------", "ปัญญา", "        return"];

/// A budgeted stream of dense text from an upstream that honours its
/// limit runs to that limit and ends with the upstream's own last chunk
/// and usage, from an OpenAI-compatible server, TGI or vLLM: the gateway
/// cuts a stream at its reservation by the fewest tokens its output can
/// be (a token a chunk, a token each 16 bytes), or by vLLM's own count,
/// not by the estimate, which takes these at 2 to 3.3 times their count.
#[tokio::test]
async fn a_budgeted_stream_of_dense_text_runs_to_its_limit() {
    let kinds = [
        ("openai", MockUpstream::openai as fn() -> MockUpstream),
        ("tgi", MockUpstream::tgi),
        ("vllm", MockUpstream::openai),
    ];
    for ((kind, upstream), word) in kinds.into_iter().flat_map(|k| DENSE_TOKENS.map(|w| (k, w))) {
        let upstream = upstream().answers_of(2_000).token_text(word);
        let (chunks, gateway) = stream_from(
            kind,
            upstream,
            json!({"model": "chat", "messages": user("hi"), "stream": true, "max_tokens": 200,
                   "stream_options": {"include_usage": true}}),
        )
        .await;
        let content = chunks
            .iter()
            .filter(|c| c["choices"][0]["delta"]["content"] == word)
            .count();
        assert_eq!(content, 200, "{kind} {word}");
        let usage = &chunks[chunks.len() - 1]["usage"];
        assert_eq!(usage["completion_tokens"], 200, "{kind} {word}: {usage}");
        let finish = &chunks[chunks.len() - 2];
        let finish = &finish["choices"][0]["finish_reason"];
        assert_eq!(finish, "length", "{kind} {word}");
        assert_eq!(cut(&gateway, "gateway").await, None, "{kind} {word}");
        // 11 prompt tokens, as the mock counts them, and 200 output.
        let spent = spent(&gateway).await;
        assert!((spent - 0.002011).abs() < 1e-9, "{kind} {word}: ${spent}");
    }
}

/// An upstream that ignores its limit and packs four tokens of English
/// into a chunk is cut once its text passes 16 bytes a token: the 491
/// chunks the reservation pays for at a token a chunk (1,964 tokens to
/// the upstream), charged as the 491 tokens of the limit it was sent.
#[tokio::test]
async fn an_upstream_that_ignores_its_limit_in_chunks_of_several_tokens_is_cut_at_16_bytes_a_token()
{
    let word = "tok tok tok tok ";
    let upstream = MockUpstream::openai()
        .answers_of_ignoring_max_tokens(2_000)
        .token_text(word);
    let (chunks, gateway) = stream_from(
        "openai",
        upstream,
        json!({"model": "chat", "messages": user("hi"), "stream": true}),
    )
    .await;
    let content = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"] == word)
        .count();
    assert_eq!(content, AFFORDED as usize);
    assert_eq!(cut(&gateway, "gateway").await, Some(1.0));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // "hi" estimated at 5 prompt tokens, and the limit's 491.
    let spent = spent(&gateway).await;
    assert!((spent - 0.004915).abs() < 1e-9, "${spent}");
}

/// An upstream that reports no usage is charged the estimate of what it
/// streamed, at least a token a chunk and at most the limit it was sent:
/// waves of 100 streams of dense text at once, each to its limit of 200
/// tokens, which the estimate alone takes at up to 650, spend no more
/// than the budget.
#[tokio::test]
async fn a_budget_holds_with_100_dense_streams_whose_upstream_reports_no_usage() {
    for word in DENSE_TOKENS {
        let sse = mock::stream_without_usage([word; 200], "length");
        let upstream = MockUpstream::openai().stream_bytes(sse);
        let (served, overrun) = overrun_of(
            upstream,
            100,
            |_| json!({"model": "chat", "messages": user("hi"), "stream": true, "max_tokens": 200}),
        )
        .await;
        assert!(served >= 40, "{word}: {served} served");
        assert!(overrun <= 0.0, "{word}: overrun ${overrun}");
    }
}

#[tokio::test]
async fn a_stream_cut_at_its_reservation_without_usage_asked_for_still_names_its_stream() {
    // No usage chunk is asked for: only the reservation makes the gateway
    // keep the first chunk, whose identity the last chunk it writes takes.
    let (chunks, gateway) = stream_past_its_reservation(
        json!({"model": "chat", "messages": user("hi"), "stream": true}),
    )
    .await;
    assert!(
        chunks
            .iter()
            .all(|c| c.get("usage").is_none_or(Value::is_null))
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["id"], "chatcmpl-mock", "the stream's own identity");
    assert_eq!(last["model"], chunks[0]["model"]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spent = spent(&gateway).await;
    assert!(spent <= 0.005, "spent ${spent}");
}

#[tokio::test]
async fn a_streamed_tool_call_is_output_and_ends_at_its_reservation() {
    // The model calls a tool whose arguments run to 2,000 tokens: they are
    // generated and billed as text is, and cut where text would be.
    let tools = json!([{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]);
    let (chunks, gateway) = stream_past_its_reservation(json!({
        "model": "chat", "messages": user("hi"), "tools": tools, "stream": true,
        "stream_options": {"include_usage": true},
    }))
    .await;
    let pieces = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] == "tok ")
        .count();
    assert!(
        (AFFORDED_WITH_A_TOOL as usize - 9..=AFFORDED_WITH_A_TOOL as usize).contains(&pieces),
        "about what the reservation pays for: {pieces}"
    );
    let last = &chunks[chunks.len() - 2];
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spent = spent(&gateway).await;
    assert!(spent <= 0.005, "spent ${spent}");
    // The output the reservation pays for; of the 436 prompt tokens held
    // for the prompt, the upstream counted 11.
    assert!(spent > 0.0045, "spent ${spent}");
}

#[tokio::test]
async fn a_stream_of_several_answers_cut_at_its_reservation_ends_each_of_them() {
    let (chunks, gateway) = stream_past_its_reservation(
        json!({"model": "chat", "messages": user("hi"), "stream": true, "n": 2}),
    )
    .await;
    let content = chunks
        .iter()
        .filter(|c| c["choices"][0]["delta"]["content"] == "tok ")
        .count();
    assert_eq!(
        content, AFFORDED as usize,
        "what the reservation pays for, both answers together"
    );
    let ended: Vec<&Value> = chunks
        .iter()
        .filter(|c| c["choices"][0]["finish_reason"] == "length")
        .map(|c| &c["choices"][0]["index"])
        .collect();
    assert_eq!(ended, [0, 1], "the last chunks end each answer");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let spent = spent(&gateway).await;
    assert!(spent <= 0.005, "spent ${spent}");
}

#[tokio::test]
async fn messages_and_responses_streams_that_reach_their_reservation_end_at_their_length_limit() {
    let asks = [
        (
            "/v1/messages",
            json!({"model": "chat", "max_tokens": 400, "stream": true, "messages": user("hi")}),
            400..=400,
        ),
        (
            "/v1/responses",
            json!({"model": "chat", "stream": true, "input": "hi"}),
            AFFORDED..=AFFORDED,
        ),
        // The model calls a tool, and the call runs past the reservation:
        // its arguments, measured as text, come to about as many tokens.
        (
            "/v1/messages",
            json!({"model": "chat", "max_tokens": 400, "stream": true, "messages": user("hi"),
                   "tools": [{"name": "search", "input_schema": {"type": "object"}}]}),
            395..=400,
        ),
        (
            "/v1/responses",
            json!({"model": "chat", "stream": true, "input": "hi",
                   "tools": [{"type": "function", "name": "search", "parameters": {"type": "object"}}]}),
            AFFORDED_WITH_A_TOOL - 9..=AFFORDED_WITH_A_TOOL,
        ),
    ];
    for (path, body, tokens) in asks {
        let upstream = MockUpstream::openai()
            .answers_of_ignoring_max_tokens(2_000)
            .start()
            .await;
        let gateway = start(&config(&upstream, 0.005)).await;
        let response = gateway.post_as("team-secret", path, body.clone()).await;
        assert_eq!(response.status(), 200, "{path}");
        let events = named_events(&response.text().await.unwrap());
        let (name, last) = events.last().unwrap();
        if path == "/v1/messages" {
            assert_eq!(name, "message_stop");
            let delta = &events[events.len() - 2].1;
            assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
            let output = delta["usage"]["output_tokens"].as_u64().unwrap();
            assert!(tokens.contains(&output), "{body}: {output}");
        } else {
            assert_eq!(name, "response.incomplete");
            let response = &last["response"];
            assert_eq!(
                response["incomplete_details"]["reason"],
                "max_output_tokens"
            );
            let output = response["usage"]["output_tokens"].as_u64().unwrap();
            assert!(tokens.contains(&output), "{body}: {output}");
            assert_eq!(response["output"][0]["status"], "incomplete");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let spent = spent(&gateway).await;
        assert!(spent <= 0.005, "{path}: spent ${spent}");
    }
}
