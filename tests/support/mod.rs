//! Test support shared by the integration tests: mock upstreams, the
//! gateway under test with its client, and plan-level helpers.

pub mod gateway;
pub mod mock;
pub mod plan;
