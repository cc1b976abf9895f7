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
}
