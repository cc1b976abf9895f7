//! Test support shared by the integration tests: mock upstreams.

pub mod mock;
