//! Validation of a Bedrock backend's AWS fields.

use super::Validator;
use crate::config::schema::RawBackend;
use crate::config::types::{AwsKeys, AwsSettings, BackendKind};

impl Validator<'_> {
    /// Bedrock's AWS settings: a region, and either SigV4 keys from the
    /// environment or a Bedrock API key (`api_key_env`), exactly one.
    /// Other kinds may not carry any `aws_*` field.
    pub(super) fn aws(
        &mut self,
        i: usize,
        kind: BackendKind,
        b: &RawBackend,
    ) -> Option<AwsSettings> {
        let at = |field: &str| format!("backends[{i}].{field}");
        let fields = [
            ("aws_region", &b.aws_region),
            ("aws_access_key_id_env", &b.aws_access_key_id_env),
            ("aws_secret_access_key_env", &b.aws_secret_access_key_env),
            ("aws_session_token_env", &b.aws_session_token_env),
        ];
        if kind != BackendKind::Bedrock {
            for (field, value) in fields {
                if value.is_some() {
                    self.problem(
                        at(field),
                        format!("only a bedrock backend takes {field}; remove it"),
                    );
                }
            }
            return None;
        }
        let region = match b.aws_region.as_deref() {
            Some(region) if is_aws_region(region) => Some(region.to_owned()),
            Some(region) => {
                self.problem(
                    at("aws_region"),
                    format!("\"{region}\" is not an AWS region; write one such as \"us-east-1\""),
                );
                None
            }
            None => {
                self.problem(
                    at("aws_region"),
                    "a bedrock backend needs aws_region, the AWS region it calls, such as \"us-east-1\"",
                );
                None
            }
        };
        let keys = match (
            &b.api_key_env,
            &b.aws_access_key_id_env,
            &b.aws_secret_access_key_env,
        ) {
            (None, Some(id), Some(secret)) => {
                let access_key_id = self.secret(at("aws_access_key_id_env"), id);
                let secret_access_key = self.secret(at("aws_secret_access_key_env"), secret);
                let session_token = b
                    .aws_session_token_env
                    .as_ref()
                    .map(|var| self.secret(at("aws_session_token_env"), var));
                // A secret not read (a problem, or an offline check) leaves
                // the backend without keys; its region still stands.
                match (access_key_id, secret_access_key, session_token) {
                    (
                        Some(access_key_id),
                        Some(secret_access_key),
                        session_token @ (None | Some(Some(_))),
                    ) => Some(AwsKeys {
                        access_key_id,
                        secret_access_key,
                        session_token: session_token.flatten(),
                    }),
                    _ => None,
                }
            }
            (Some(_), None, None) => {
                if b.aws_session_token_env.is_some() {
                    self.problem(
                        at("aws_session_token_env"),
                        "a session token goes with aws_access_key_id_env and aws_secret_access_key_env, not with a Bedrock API key; remove it",
                    );
                }
                None
            }
            (None, None, None) => {
                self.problem(
                    format!("backends[{i}]"),
                    "a bedrock backend needs credentials: aws_access_key_id_env and aws_secret_access_key_env (SigV4), or api_key_env (a Bedrock API key)",
                );
                None
            }
            (Some(_), _, _) => {
                self.problem(
                    format!("backends[{i}]"),
                    "give either api_key_env (a Bedrock API key) or aws_access_key_id_env and aws_secret_access_key_env (SigV4), not both",
                );
                None
            }
            (None, None, Some(_)) => {
                self.problem(
                    at("aws_access_key_id_env"),
                    "is needed with aws_secret_access_key_env",
                );
                None
            }
            (None, Some(_), None) => {
                self.problem(
                    at("aws_secret_access_key_env"),
                    "is needed with aws_access_key_id_env",
                );
                None
            }
        };
        Some(AwsSettings {
            region: region?,
            keys,
        })
    }
}

/// An AWS region name such as `us-east-1` or `eu-central-1`: lowercase
/// words and a number, joined by dashes. It becomes part of a host name.
fn is_aws_region(region: &str) -> bool {
    let parts: Vec<&str> = region.split('-').collect();
    parts.len() >= 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
        && parts
            .last()
            .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
}
