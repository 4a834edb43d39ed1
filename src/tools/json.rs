//! Minimal JSON output for `list --json` and `diagnose --json` (no serde: the design card keeps
//! runtime crates to a fixed few).

use std::fmt::Write as _;

/// A JSON string literal: quotes, backslashes and control characters escaped.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(q, "\\u{:04x}", c as u32);
            }
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// `null` or the quoted string.
pub fn opt(s: Option<&str>) -> String {
    s.map_or("null".to_string(), quote)
}

/// A JSON array of already-rendered values.
pub fn array<I: IntoIterator<Item = String>>(items: I) -> String {
    format!("[{}]", items.into_iter().collect::<Vec<_>>().join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(opt(None), "null");
        assert_eq!(array(["1".to_string(), quote("x")]), "[1,\"x\"]");
    }
}
