//! Validation of a Bedrock backend's own fields: its AWS settings and the
//! parameters it drops.

use super::Validator;
use crate::config::schema::RawBackend;
use crate::config::types::{AwsKeys, AwsSettings, BEDROCK_UNHONOURED, BackendKind};

impl Validator<'_> {
    /// Bedrock's AWS settings: a region, and either SigV4 keys from the
    /// environment or a Bedrock API key (`api_key_env`), exactly one; and
    /// `drop_params`. Other kinds may carry none of these fields.
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
            let drop_params = ("drop_params", b.drop_params.is_some());
            for (field, present) in fields
                .map(|(field, value)| (field, value.is_some()))
                .into_iter()
                .chain([drop_params])
            {
                if present {
                    self.problem(
                        at(field),
                        format!("only a bedrock backend takes {field}; remove it"),
                    );
                }
            }
            return None;
        }
        let drop_params = self.drop_params(i, b.drop_params.as_deref().unwrap_or_default());
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
            drop_params,
        })
    }

    /// Only parameters Bedrock would refuse can be dropped: any other name
    /// is misspelt or already honoured.
    fn drop_params(&mut self, i: usize, names: &[String]) -> Vec<String> {
        for (j, name) in names.iter().enumerate() {
            if !BEDROCK_UNHONOURED.contains(&name.as_str()) {
                self.problem(
                    format!("backends[{i}].drop_params[{j}]"),
                    format!(
                        "\"{name}\" is not a parameter Bedrock refuses; name one of: {}",
                        BEDROCK_UNHONOURED.join(", ")
                    ),
                );
            }
        }
        names.to_vec()
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
