//! Cleaning what browsers send before it is logged or stored: URLs lose
//! their query string and fragment (they carry personal data), text loses
//! control characters and is bounded.

use serde_json::Value;

/// Longest text field logged or stored, in characters.
pub const MAX_FIELD: usize = 1024;

/// `https://app.example/page?token=x#frag` → `https://app.example/page`.
pub fn cut_query(url: &str) -> &str {
    match url.find(['?', '#']) {
        Some(end) => &url[..end],
        None => url,
    }
}

/// Without control characters, at most `MAX_FIELD` characters.
pub fn text(value: &str) -> String {
    value
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_FIELD)
        .collect()
}

/// Cuts the query string of every URL-looking string in `value`.
pub fn cut_queries_in(value: &mut Value) {
    match value {
        Value::String(s) if s.contains("://") && s.contains(['?', '#']) => {
            let cut = cut_query(s).to_owned();
            *s = cut;
        }
        Value::Array(items) => items.iter_mut().for_each(cut_queries_in),
        Value::Object(map) => map.values_mut().for_each(cut_queries_in),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_and_fragments_are_cut() {
        assert_eq!(
            cut_query("https://a.example/p?x=1#f"),
            "https://a.example/p"
        );
        assert_eq!(cut_query("https://a.example/p#f?x"), "https://a.example/p");
        assert_eq!(cut_query("inline"), "inline");
        let mut v = serde_json::json!({"a": ["https://x.example/?t=1", "plain?text"], "b": {"c": "http://y/#z"}});
        cut_queries_in(&mut v);
        assert_eq!(
            v,
            serde_json::json!({"a": ["https://x.example/", "plain?text"], "b": {"c": "http://y/"}})
        );
    }

    #[test]
    fn control_characters_are_stripped_and_text_bounded() {
        assert_eq!(text("a\u{0}b\nc\u{1b}[31m"), "abc[31m");
        assert_eq!(text(&"x".repeat(5000)).len(), MAX_FIELD);
    }
}
