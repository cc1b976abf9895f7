//! Whether a config, served on an address, lets anyone who reaches the
//! gateway spend through it. Like Redis's protected mode: a gateway with
//! no `[[keys]]`, on an address other hosts reach, in front of a backend
//! that costs money, serves only when the config says that is meant
//! (`server.allow_anonymous`, for a gateway whose callers something in
//! front authenticates). A config that lost its keys never opens the
//! gateway to the network, at start or at a reload.

use std::net::SocketAddr;

use super::{BackendKind, Config, Problem};

/// The problem with serving `config` on `listen`, if anyone who reaches
/// that address could spend through it.
pub fn open_to_network(config: &Config, listen: SocketAddr) -> Option<Problem> {
    if config.server.allow_anonymous
        || !config.keys.is_empty()
        || listen.ip().to_canonical().is_loopback()
    {
        return None;
    }
    let backend = config
        .backends
        .iter()
        .find(|b| b.kind != BackendKind::Simulated)?;
    Some(Problem::new(
        "keys",
        format!(
            "there are no [[keys]] and the gateway listens on {listen}, which other hosts \
             reach: anyone who can reach it could use backend \"{}\" at your cost; add \
             [[keys]], listen on a loopback address (127.0.0.1), or, if a proxy in front \
             authenticates every caller, set server.allow_anonymous = true",
            backend.name
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::MINIMAL;
    use crate::config::{Secrets, parse_with};

    const GROQ: &str = r#"
[[backends]]
name = "groq"
kind = "groq"
base_url = "https://api.groq.com/openai"
api_key_env = "GROQ_KEY"
"#;
    const KEY: &str = r#"
[[keys]]
name = "team"
key_env = "TEAM_KEY"
models = ["*"]
"#;

    fn config(parts: &[&str]) -> Config {
        let text = parts.concat();
        let env = |_: &str| Some("a-long-enough-secret-for-the-check".to_owned());
        parse_with(&text, Secrets::Read(&env)).unwrap_or_else(|p| panic!("{p}\n{text}"))
    }

    fn at(address: &str) -> SocketAddr {
        address.parse().unwrap()
    }

    #[test]
    fn a_keyless_gateway_in_front_of_a_paid_backend_is_refused_on_every_address_others_reach() {
        let open = config(&[MINIMAL, GROQ]);
        for address in [
            "0.0.0.0:8080",
            "[::]:8080",
            "10.0.0.7:8080",
            "192.168.1.2:1",
        ] {
            let problem = open_to_network(&open, at(address)).expect(address);
            assert_eq!(problem.path, "keys");
            assert!(
                problem
                    .message
                    .contains(&format!("listens on {}", at(address)))
                    && problem.message.contains("backend \"groq\"")
                    && problem.message.contains("server.allow_anonymous = true"),
                "{problem}"
            );
        }
    }

    #[test]
    fn loopback_keys_simulated_backends_or_the_configs_word_let_it_serve() {
        let open = config(&[MINIMAL, GROQ]);
        let loopbacks = [
            "127.0.0.1:8080",
            "127.3.2.1:1",
            "[::1]:8080",
            "[::ffff:127.0.0.1]:80",
        ];
        for loopback in loopbacks {
            assert!(open_to_network(&open, at(loopback)).is_none(), "{loopback}");
        }
        let anywhere = at("0.0.0.0:8080");
        let keyed = config(&[MINIMAL, GROQ, KEY]);
        assert!(open_to_network(&keyed, anywhere).is_none());
        let simulated = config(&[MINIMAL]);
        assert!(open_to_network(&simulated, anywhere).is_none());
        let said = config(&["[server]\nallow_anonymous = true\n", MINIMAL, GROQ]);
        assert!(open_to_network(&said, anywhere).is_none());
    }
}
