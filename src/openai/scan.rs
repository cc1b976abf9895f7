//! Looking into a JSON object for a few of its members without parsing it:
//! what the gateway reads of each stream chunk it forwards as it came. A
//! quoted name followed by a colon is a member name wherever it is, unless
//! a backslash comes before it: inside a string, a quote is escaped, and a
//! string's closing quote is never followed by a name. So a key that ends
//! with an escaped quote and the name (a log-probability keyed by the
//! token `"usage`) is not taken for the member.

use memchr::memmem::Finder;

/// The value of each member that `name` (a searcher for a member name in
/// its quotes) finds in `json`, in order, each from its first byte to the
/// end of `json`. A name not followed by a colon (a string value) is none.
pub fn member_values<'j>(name: &'j Finder<'_>, json: &'j [u8]) -> impl Iterator<Item = &'j [u8]> {
    let mut from = 0;
    std::iter::from_fn(move || {
        let at = from + name.find(&json[from..])?;
        from = at + name.needle().len();
        Some((json[..at].last() != Some(&b'\\'), &json[from..]))
    })
    .filter_map(|(unescaped, rest)| {
        let rest = rest.trim_ascii_start().strip_prefix(b":")?;
        unescaped.then(|| rest.trim_ascii_start())
    })
}

/// Whether a member whose value starts at byte `at` of `json`, an object,
/// is one of its own rather than of an object nested in it (a
/// log-probability keyed by a token, which can be any word). Scans what
/// comes before `at`: called only once a name is found.
pub fn in_top_level(json: &[u8], at: usize) -> bool {
    let before = &json[..at];
    let (mut depth, mut i) = (0usize, 0);
    while i < before.len() {
        match before[i] {
            b'"' => {
                // To the string's closing quote: past each escape.
                i += 1;
                loop {
                    let Some(found) = before
                        .get(i..)
                        .and_then(|s| memchr::memchr2(b'"', b'\\', s))
                    else {
                        return false;
                    };
                    i += found;
                    if before[i] == b'"' {
                        break;
                    }
                    i += 2;
                }
            }
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    depth == 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_of_members_are_found_whatever_the_spacing_and_strings_are_not() {
        let name = Finder::new(b"\"id\"");
        let json = br#"{"id" :	"a","x":"id","s":"\"id\":1","\"id":2,"t":[{"id":""}]}"#;
        let values: Vec<&[u8]> = member_values(&name, json).collect();
        assert_eq!(values.len(), 2, "{values:?}");
        assert!(values[0].starts_with(br#""a","#));
        assert!(values[1].starts_with(br#""""#));
    }

    #[test]
    fn a_member_of_a_nested_object_is_not_in_the_top_level() {
        let name = Finder::new(b"\"usage\"");
        let json = br#"{"a":"{[\"\\","b":[{"usage":-0.5}],"usage":{"n":1}}"#;
        let tops: Vec<bool> = member_values(&name, json)
            .map(|value| in_top_level(json, json.len() - value.len()))
            .collect();
        assert_eq!(tops, [false, true]);
    }
}
