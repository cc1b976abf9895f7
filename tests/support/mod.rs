//! Test support shared by the integration tests: mock upstreams, one
//! module per protocol on a shared server (`mock`), the one config builder
//! (`config`), the gateway under test with its client (`gateway`), the
//! backend kinds a behaviour suite runs against (`kinds`),
//! plan-level helpers (`plan`), the gateway as a process (`process`),
//! throwaway Redis and PostgreSQL servers (`redis`, `postgres`), the
//! ports they listen on (`ports`), certificates for their TLS (`certs`),
//! and how vision models count an image (`vision`).

#![allow(
    dead_code,
    reason = "each test binary and bench uses a different part of the support code"
)]

pub mod bedrock_mock;
pub mod certs;
pub mod config;
pub mod gateway;
pub mod kinds;
pub mod mock;
pub mod openai_mock;
pub mod otlp;
pub mod plan;
pub mod ports;
pub mod postgres;
pub mod process;
pub mod redis;
pub mod sigv4;
pub mod tgi_mock;
pub mod vision;
