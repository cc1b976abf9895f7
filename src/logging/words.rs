//! What a message quotes of others' strings, word by word.

use super::{MAX_CLIENT_CHARS, MAX_MESSAGE_CHARS, bounded};

/// A message that quotes others' strings (names from a config file, what
/// a client sent), each word of it [`bounded`]: a word runs to the next
/// space, or, from a quote (`"` or `` ` ``), to the quote that closes it,
/// so a quoted name is one word, cut at [`MAX_CLIENT_CHARS`] inside the
/// quotes and brackets around it. The whole is cut at
/// [`MAX_MESSAGE_CHARS`], against a string of many short words.
pub fn echo_words(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_MESSAGE_CHARS + 3));
    let mut rest = text;
    // Past this many bytes the cut below falls on what is already here.
    while !rest.is_empty() && out.len() <= MAX_MESSAGE_CHARS * 4 {
        let spaces = rest.len() - rest.trim_start_matches(' ').len();
        out.push_str(&rest[..spaces]);
        rest = &rest[spaces..];
        let word = &rest[..word_end(rest)];
        rest = &rest[word.len()..];
        let opening = affix(word.chars(), OPENING);
        let closing = word.len() - affix(word[opening..].chars().rev(), CLOSING);
        out.push_str(&word[..opening]);
        out.push_str(&bounded(
            word[opening..closing].to_owned(),
            MAX_CLIENT_CHARS,
        ));
        out.push_str(&word[closing..]);
    }
    bounded(out, MAX_MESSAGE_CHARS)
}

const QUOTES: [char; 2] = ['"', '`'];
/// What a word opens or closes with around what it quotes.
const OPENING: &[char] = &['"', '`', '(', '['];
const CLOSING: &[char] = &['"', '`', ')', ']', ',', ';', ':', '.'];

/// The bytes of the first few `chars` that are of `set`.
fn affix(chars: impl Iterator<Item = char>, set: &[char]) -> usize {
    chars
        .take(4)
        .take_while(|c| set.contains(c))
        .map(char::len_utf8)
        .sum()
}

/// Where the word `text` starts with ends: at a space outside quotes.
fn word_end(text: &str) -> usize {
    let mut open: Option<char> = None;
    for (at, c) in text.char_indices() {
        match open {
            Some(quote) if c == quote => open = None,
            Some(_) => {}
            None if c == ' ' => return at,
            None if QUOTES.contains(&c) => open = Some(c),
            None => {}
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_word_of_a_message_is_echoed_and_the_whole_bounded() {
        let long = "x".repeat(100_000);
        let cut = format!("{}…", "x".repeat(MAX_CLIENT_CHARS));
        // Quoted, with spaces in the quotes, in backticks, bare in a list.
        let spaced = format!("a {long}");
        for (text, expected) in [
            (
                format!("no backend named \"{long}\" (backends: a, {long})"),
                format!("no backend named \"{cut}\" (backends: a, {cut})"),
            ),
            (
                format!("\"{spaced}\" may use only letters"),
                format!(
                    "\"a {}…\" may use only letters",
                    "x".repeat(MAX_CLIENT_CHARS - 2)
                ),
            ),
            (
                format!("unknown field `{long}`, expected `a`"),
                format!("unknown field `{cut}`, expected `a`"),
            ),
            ("key \"a\nb\" has".into(), "key \"a\\nb\" has".into()),
            (
                "must be 1 to 128 characters long".into(),
                "must be 1 to 128 characters long".into(),
            ),
        ] {
            assert_eq!(echo_words(&text), expected);
        }
        // Many short words: the whole is cut.
        let words = echo_words(&"a ".repeat(100_000));
        assert_eq!(words.chars().count(), MAX_MESSAGE_CHARS + 1);
        assert!(words.ends_with('…'));
        // A quote never closed runs to the end, as one word.
        assert_eq!(echo_words(&format!("\"{long}")), format!("\"{cut}"));
    }
}
