//! Cleaning what browsers send before it is logged or stored: URLs lose
//! their query string and fragment (they carry personal data), text loses
//! control characters and is bounded.

use serde_json::Value;

/// Longest text field logged or stored, in characters.
pub const MAX_FIELD: usize = 1024;

/// Keys whose values are URLs in the shapes browsers send.
pub const URL_KEYS: [&str; 14] = [
    "document-uri",
    "documenturl",
    "documenturi",
    "blocked-uri",
    "blockedurl",
    "blockeduri",
    "referrer",
    "source-file",
    "sourcefile",
    "url",
    "previousresponseurl",
    "nextresponseurl",
    "document-url",
    "blocked-url",
];

/// Keys whose values are samples of page content (may hold anything).
pub const SAMPLE_KEYS: [&str; 2] = ["script-sample", "sample"];

/// `https://user:pw@app.example/page;jsessionid=x?token=x#frag` →
/// `https://app.example/page`: no credentials, path parameters, query or
/// fragment.
pub fn cut_query(url: &str) -> String {
    let end = url.find(['?', '#', ';']).unwrap_or(url.len());
    let url = &url[..end];
    match url.find("://") {
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{}{}", &url[..scheme_end + 3], &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
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

/// Cuts every URL in `value` (values of URL keys, and any string with a
/// scheme) and empties content samples.
pub fn cut_queries_in(value: &mut Value) {
    match value {
        Value::String(s) if s.contains("://") => *s = cut_query(s),
        Value::Array(items) => items.iter_mut().for_each(cut_queries_in),
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                let key = key.to_ascii_lowercase();
                match value {
                    Value::String(s) if URL_KEYS.contains(&key.as_str()) => *s = cut_query(s),
                    Value::String(s) if SAMPLE_KEYS.contains(&key.as_str()) => s.clear(),
                    other => cut_queries_in(other),
                }
            }
        }
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
