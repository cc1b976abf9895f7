//! Turns a request into a plan: the deployments to try, in order.
//!
//! Deployments are tried in the order the config lists them; the next one
//! is tried only after a retriable failure before the first byte reached
//! the client.

use crate::config::{Deployment, Model};

/// At most this many deployments are tried for one request.
pub const MAX_ATTEMPTS: usize = 3;

pub fn plan(model: &Model) -> impl Iterator<Item = &Deployment> {
    model.deployments.iter().take(MAX_ATTEMPTS)
}
