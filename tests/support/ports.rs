//! Ports for the services the tests run as processes of their own (Redis,
//! PostgreSQL). A test picks the port, the service binds it later, and
//! binds it again after a test restarts it: a port from the kernel's
//! ephemeral range, which every listener on port 0 and every outgoing
//! connection of a parallel test draws from, can be taken in between.
//! These come from below that range, where only explicit binds go.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::TcpListener;

/// The lowest port a service is given: above the well-known and the
/// commonly configured ones.
const LOWEST: u16 = 10_000;

/// A port below the ephemeral range that nothing listens on now, picked
/// at random, so that test processes running at once rarely pick the same.
pub fn service_port() -> u16 {
    let ephemeral = ephemeral_start();
    loop {
        let random = RandomState::new().build_hasher().finish();
        let span = u64::from(ephemeral - LOWEST);
        let port = LOWEST + u16::try_from(random % span).expect("below the ephemeral range");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Where the kernel's ephemeral ports start (Linux's default, 32768,
/// where it does not say).
fn ephemeral_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse().ok())
        .filter(|&start| start > LOWEST + 1000)
        .unwrap_or(32_768)
}
