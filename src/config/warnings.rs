//! What `tollgate check` warns about: a valid config that probably does
//! not mean what it says, chiefly where the Llama licence rule (no
//! multimodal Llama for users in the EU) could be escaped, and a key or
//! token short enough to guess.

use super::Problem;
use super::types::Config;

/// A key or token clients present shorter than this can be guessed: 16
/// random letters and digits are about 95 bits.
pub(super) const MIN_CREDENTIAL_CHARS: usize = 16;

/// Every warning for `config`, each with the path of the value to change;
/// `short_secrets`: the paths of the keys' and tokens' environment
/// variables whose secret is shorter than `MIN_CREDENTIAL_CHARS`.
pub(super) fn warnings(config: &Config, short_secrets: &[String]) -> Vec<Problem> {
    let mut warnings = Vec::new();
    for (i, model) in config.models.iter().enumerate() {
        for (j, d) in model.deployments.iter().enumerate() {
            let at = |field: &str| format!("models[{i}].deployments[{j}].{field}");
            let id = &d.upstream_model;
            if names_llama(id) && !d.is_llama() {
                warnings.push(Problem::new(
                    at("licence"),
                    format!(
                        "upstream model \"{id}\" is a Llama model, but its licence is not \"llama\"; set licence = \"llama\" so the Llama licence rules apply to it"
                    ),
                ));
            }
            if names_multimodal_llama(id) && !d.multimodal {
                warnings.push(Problem::new(
                    at("multimodal"),
                    format!(
                        "upstream model \"{id}\" is a multimodal Llama (Llama 3.2 Vision or Llama 4); set multimodal = true so it never serves users in the EU"
                    ),
                ));
            }
        }
    }
    warnings.extend(eu_escapes(config));
    warnings.extend(short_secrets.iter().map(|path| {
        Problem::new(
            path.as_str(),
            format!(
                "the secret in this environment variable is shorter than {MIN_CREDENTIAL_CHARS} characters, short enough to guess; use at least {MIN_CREDENTIAL_CHARS} random ones (`openssl rand -hex 16` prints 32)"
            ),
        )
    }));
    warnings
}

/// Keys through which a user in the EU could reach a multimodal Llama
/// deployment: the EU rule sees only the request's region, and a key that
/// lets its callers choose one, or leaves it unset, gives it no EU region.
fn eu_escapes(config: &Config) -> Vec<Problem> {
    let policy = &config.policy;
    let restricted: Vec<&str> = config
        .models
        .iter()
        .filter(|m| m.deployments.iter().any(|d| d.is_llama() && d.multimodal))
        .map(|m| m.alias.as_str())
        .collect();
    if !policy.llama_eu_multimodal_block || policy.eu_regions.is_empty() || restricted.is_empty() {
        return Vec::new();
    }
    let aliases = restricted.join("\", \"");
    let unset = policy.default_region.is_none();
    let mut warnings = Vec::new();
    // The rule matches region names exactly: an `eu-west-1` key is not
    // `eu` unless `eu_regions` says so.
    let european = |path: String, whose: String, region: &str| {
        (names_europe(region) && !policy.is_eu(region)).then(|| {
            Problem::new(
                path,
                format!(
                    "{whose} names a place in Europe but is not in policy.eu_regions, so the multimodal Llama deployments of \"{aliases}\" serve it; add it to policy.eu_regions if its users are in the EU"
                ),
            )
        })
    };
    warnings.extend(policy.default_region.as_deref().and_then(|region| {
        european(
            "policy.default_region".into(),
            format!("the default region \"{region}\""),
            region,
        )
    }));
    if config.keys.is_empty() {
        warnings.push(Problem::new(
            "keys",
            format!(
                "with no [[keys]], every caller chooses its region with x-tollgate-region{}, so a user in the EU can reach the multimodal Llama deployments of \"{aliases}\"; add keys with a region",
                if unset { " or sends none" } else { "" }
            ),
        ));
    }
    for (i, key) in config.keys.iter().enumerate() {
        if !restricted.iter().any(|alias| key.models.allows(alias)) {
            continue;
        }
        warnings.extend(key.region.as_deref().and_then(|region| {
            european(
                format!("keys[{i}].region"),
                format!("the region \"{region}\" of key \"{}\"", key.name),
                region,
            )
        }));
        if key.region_header {
            warnings.push(Problem::new(
                format!("keys[{i}].region_header"),
                format!(
                    "callers of key \"{}\" choose their region with x-tollgate-region, so a user in the EU can reach the multimodal Llama deployments of \"{aliases}\" by sending another region; set region_header = false unless every caller sends its true region",
                    key.name
                ),
            ));
        }
        if key.region.is_none() && unset {
            warnings.push(Problem::new(
                format!("keys[{i}].region"),
                format!(
                    "key \"{}\" has no region and policy.default_region is unset, so its requests{} have no region and may reach the multimodal Llama deployments of \"{aliases}\" from the EU; set the key's region or policy.default_region",
                    key.name,
                    if key.region_header {
                        " without x-tollgate-region"
                    } else {
                        ""
                    }
                ),
            ));
        }
    }
    warnings
}

/// The region's name places it in Europe: an `eu` word (`eu-west-1`,
/// `eu_central`) or `europe` (`europe-west4`, `westeurope`).
fn names_europe(region: &str) -> bool {
    region.contains("europe") || region.split(['-', '_']).any(|word| word == "eu")
}

/// The upstream model id names a Llama model (`meta-llama/Llama-3.3-70B`,
/// `llama-3.1-8b-instant`, `meta.llama3-1-8b-instruct-v1:0`).
fn names_llama(id: &str) -> bool {
    id.to_ascii_lowercase().contains("llama")
}

/// The upstream model id names a multimodal Llama family: Llama 3.2
/// Vision (11B and 90B; Bedrock's `meta.llama3-2-11b-…` and `…-90b-…` are
/// the vision models), Llama 4, or the Llama Guard models built on them
/// (Llama Guard 3 Vision, Llama Guard 4, which reads images too).
fn names_multimodal_llama(id: &str) -> bool {
    // One spelling for `Llama-3.2`, `llama3.2`, `llama3-2` and `llama-4`,
    // `llama4`: separators become `-`, and none follows `llama`.
    let id = id
        .to_ascii_lowercase()
        .replace(['.', '_', ' '], "-")
        .replace("llama-", "llama");
    id.contains("llama4")
        || id.contains("llama3-2-11b")
        || id.contains("llama3-2-90b")
        || (id.contains("llama3-2") && id.contains("vision"))
        || id.contains("llamaguard-4")
        || (id.contains("llamaguard") && id.contains("vision"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_in_europe_are_recognised_by_name() {
        for region in [
            "eu",
            "eu-west-1",
            "eu_central",
            "europe-west4",
            "westeurope",
        ] {
            assert!(names_europe(region), "{region}");
        }
        for region in ["us-east-1", "neutral", "ap-south-1", "useu"] {
            assert!(!names_europe(region), "{region}");
        }
    }

    #[test]
    fn multimodal_llama_ids_are_recognised() {
        for id in [
            "meta-llama/Llama-3.2-11B-Vision-Instruct",
            "meta-llama/Llama-3.2-90B-Vision-Instruct-Turbo",
            "llama-3.2-11b-vision-preview",
            "llama-3.2-90b-vision",
            "llama3.2-vision",
            "meta-llama/Llama-4-Scout-17B-16E-Instruct",
            "meta-llama/llama-4-maverick-17b-128e-instruct",
            "llama4-scout",
            "meta.llama4-maverick-17b-instruct-v1:0",
            "us.meta.llama4-scout-17b-instruct-v1:0",
            "meta.llama3-2-11b-instruct-v1:0",
            "meta.llama3-2-90b-instruct-v1:0",
            "meta-llama/Llama-Guard-4-12B",
            "meta-llama/Llama-Guard-3-11B-Vision",
        ] {
            assert!(names_multimodal_llama(id), "{id}");
            assert!(names_llama(id), "{id}");
        }
        for id in [
            "meta-llama/Llama-3.3-70B-Instruct",
            "meta-llama/Llama-3.2-3B-Instruct",
            "meta.llama3-2-1b-instruct-v1:0",
            "meta.llama3-2-3b-instruct-v1:0",
            "llama-3.1-8b-instant",
            "meta-llama/Llama-3.1-405B-Instruct",
            "Qwen/Qwen2.5-VL-72B-Instruct",
            "meta-llama/Llama-Guard-3-8B",
            "meta-llama/Llama-Guard-3-1B",
        ] {
            assert!(!names_multimodal_llama(id), "{id}");
        }
        assert!(!names_llama("Qwen/Qwen2.5-VL-72B-Instruct"));
    }
}
