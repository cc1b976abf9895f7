//! The service every connection is served by. It gives each request its
//! id and each response the `x-request-id` header. A completion request
//! from a client that is not a browser (the SDKs, and nearly all of a
//! gateway's traffic) goes straight to the pipeline; every other request
//! goes through the router, a browser's through CORS first. Each layer a
//! request passes is code it runs and a future it moves, and at one
//! connection that code goes cold between requests, so a layer costs
//! there several times what it costs under load.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::header::ORIGIN;
use axum::http::{Method, Request};
use axum::response::Response;
use bytes::Bytes;
use tower::{Layer, ServiceExt};
use tower_http::cors::CorsLayer;

use crate::boxed;
use crate::id::REQUEST_ID_HEADER;
use crate::inbound::Api;
use crate::pipeline;
use crate::state::AppState;

use super::request_id::{self, RequestId};
use super::{INFERENCE, cors};

type Answer = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

#[derive(Clone)]
pub struct Front {
    app: Arc<AppState>,
    router: Router,
    cors: Arc<CorsLayer>,
}

impl Front {
    pub fn new(app: Arc<AppState>, router: Router) -> Self {
        let cors = Arc::new(cors::layer(app.clone()));
        Self { app, router, cors }
    }

    pub fn app(&self) -> &Arc<AppState> {
        &self.app
    }

    /// How long a kept-alive connection waits for its next request, and
    /// how long an answer waits for its client to take any of it: read as
    /// a connection opens, so a reload changes them for the connections
    /// opened after.
    pub fn waits(&self) -> (Duration, Duration) {
        let server = &self.app.snapshot.load().config.server;
        (server.keepalive_timeout, server.send_timeout)
    }
}

impl<B> hyper::service::Service<Request<B>> for Front
where
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Answer;

    fn call(&self, request: Request<B>) -> Answer {
        let (mut parts, body) = request.into_parts();
        let body = Body::new(body);
        let (id, header) = request_id::for_request(&parts.headers);
        let browser = parts.headers.contains_key(ORIGIN);
        if parts.method == Method::POST
            && !browser
            && let Some(api) = inference_api(parts.uri.path())
        {
            let app = self.app.clone();
            return boxed::pinned(|| async move {
                let mut response = pipeline::handle(app, id, api, parts.headers, body).await;
                response.headers_mut().insert(REQUEST_ID_HEADER, header);
                Ok(response)
            });
        }
        parts.extensions.insert(RequestId(id));
        let request = Request::from_parts(parts, body);
        let router = self.router.clone();
        let cors = browser.then(|| self.cors.clone());
        boxed::pinned(|| async move {
            let mut response = match cors {
                Some(cors) => cors.layer(router).oneshot(request).await,
                None => router.oneshot(request).await,
            }?;
            response.headers_mut().insert(REQUEST_ID_HEADER, header);
            Ok(response)
        })
    }
}

/// The inference API served at `path`, with or without a trailing slash.
fn inference_api(path: &str) -> Option<Api> {
    let path = path.strip_suffix('/').unwrap_or(path);
    INFERENCE
        .iter()
        .find_map(|&(route, api)| (route == path).then_some(api))
}
