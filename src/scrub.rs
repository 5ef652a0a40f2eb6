//! The one scrubber: every value that leaves the sidecar in a log line, a
//! stored report, an event, a hook payload or a mail passes through it.
//!
//! Names (header names, query parameters, form fields, JSON keys) matching
//! Django's pattern `API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|COOKIE`
//! (case-insensitive, anywhere in the name), or one of the configured extra
//! patterns, get their value replaced by [`MASK`]; `Cookie` and `Set-Cookie`
//! always do. Every value masked is also remembered in [`Secrets`], so text
//! the sidecar does not understand (the first bytes of an error page that
//! echoes the request) can have those same values cut out.

use std::collections::BTreeMap;

use http::HeaderMap;
use regex::Regex;
use serde_json::Value;

/// What a masked value is replaced with (Django's cleansed substitute).
pub const MASK: &str = "********************";

/// Django's `HIDDEN_SETTINGS` / `SafeExceptionReporterFilter` pattern.
const DJANGO_PATTERN: &str = "API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|COOKIE";

/// Secret values shorter than this are not searched for in free text: a
/// one-character password would otherwise mask every such character.
const MIN_SECRET_LEN: usize = 4;

/// Decides which names are sensitive and masks their values.
#[derive(Debug, Clone)]
pub struct Scrubber {
    names: Regex,
}

impl Default for Scrubber {
    fn default() -> Self {
        Scrubber::new(&[]).unwrap_or_else(|_| unreachable!("Django's pattern compiles"))
    }
}

/// Secrets remembered per request, at most: a request with 50,000 cookies
/// costs a bounded amount of work (its values are masked all the same).
const MAX_SECRETS: usize = 64;
/// Longest value remembered as a secret, in bytes.
const MAX_SECRET_LEN: usize = 8 * 1024;

/// Values masked while scrubbing one request, to be cut out of free text.
#[derive(Debug, Default, Clone)]
pub struct Secrets(Vec<String>);

impl Secrets {
    /// Remembers `value` (and its percent-decoded form) as a secret.
    pub fn add(&mut self, value: &str) {
        let value = value.trim();
        self.push(value);
        if value.contains(['%', '+']) {
            let decoded = percent_encoding::percent_decode_str(&value.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned();
            self.push(&decoded);
        }
    }

    fn push(&mut self, value: &str) {
        if (MIN_SECRET_LEN..=MAX_SECRET_LEN).contains(&value.len())
            && self.0.len() < MAX_SECRETS
            && !self.0.iter().any(|s| s == value)
        {
            self.0.push(value.to_owned());
        }
    }

    /// `text` with every remembered secret replaced by [`MASK`], longest
    /// first (so a token is not left half-masked by a shorter one inside it).
    pub fn redact(&self, text: &str) -> String {
        let mut secrets: Vec<&String> = self.0.iter().collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut text = text.to_owned();
        for secret in secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), MASK);
            }
        }
        text
    }

    /// True when nothing was remembered.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The longest remembered secret, in bytes.
    pub fn max_len(&self) -> usize {
        self.0.iter().map(String::len).max().unwrap_or(0)
    }

    /// Where to cut `bytes` to keep at most `limit` of them without keeping
    /// part of a secret: a secret that straddles `limit` is dropped whole.
    pub fn safe_cut(&self, bytes: &[u8], limit: usize) -> usize {
        let mut cut = limit.min(bytes.len());
        // Moving the cut back may put it inside another secret: again.
        loop {
            let before = cut;
            for secret in &self.0 {
                let needle = secret.as_bytes();
                // Every match starting in this window straddles the cut.
                let first = cut.saturating_sub(needle.len() - 1);
                let end = (cut + needle.len() - 1).min(bytes.len());
                if let Some(at) = bytes[first..end]
                    .windows(needle.len())
                    .position(|w| w == needle)
                {
                    cut = cut.min(first + at);
                }
            }
            if cut == before {
                return cut;
            }
        }
    }
}

impl Scrubber {
    /// Django's pattern extended by `extra` regexes (case-insensitive).
    pub fn new(extra: &[String]) -> Result<Scrubber, String> {
        let mut pattern = format!("(?i){DJANGO_PATTERN}");
        for p in extra {
            Regex::new(p).map_err(|e| format!("`{p}` is not a valid regex: {e}"))?;
            pattern.push_str("|(?:");
            pattern.push_str(p);
            pattern.push(')');
        }
        let names = Regex::new(&pattern).map_err(|e| e.to_string())?;
        Ok(Scrubber { names })
    }

    /// True when values of `name` are masked.
    pub fn is_sensitive(&self, name: &str) -> bool {
        self.names.is_match(name)
    }

    /// The headers as a name → value map (repeated headers joined with
    /// `, `), sensitive values masked; `Cookie` and `Set-Cookie` always.
    pub fn headers(&self, headers: &HeaderMap, secrets: &mut Secrets) -> BTreeMap<String, String> {
        let mut out: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in headers {
            let text = String::from_utf8_lossy(value.as_bytes());
            let masked = name == http::header::COOKIE
                || name == http::header::SET_COOKIE
                || self.is_sensitive(name.as_str());
            let shown = if !masked && text.contains(['?', '#', '@']) {
                // A URL in any header (Referer, Origin, X-Original-URL):
                // its password and sensitive parameters are masked too.
                std::borrow::Cow::Owned(self.url(&text, secrets))
            } else if masked {
                secrets.add(&text);
                if name == http::header::COOKIE {
                    for pair in text.split(';') {
                        if let Some((_, v)) = pair.split_once('=') {
                            secrets.add(v);
                        }
                    }
                } else if let Some((_scheme, credentials)) = text.split_once(' ') {
                    // `Authorization: Bearer <token>`: the token alone too.
                    secrets.add(credentials);
                }
                std::borrow::Cow::Borrowed(MASK)
            } else {
                text
            };
            out.entry(name.as_str().to_owned())
                .and_modify(|v| {
                    v.push_str(", ");
                    v.push_str(&shown);
                })
                .or_insert_with(|| shown.into_owned());
        }
        out
    }

    /// A query string or form body (`a=1&token=x`) with sensitive values
    /// masked. Names are compared percent-decoded (`%74oken` is `token`);
    /// everything else is kept byte for byte.
    pub fn query(&self, query: &str, secrets: &mut Secrets) -> String {
        let mut out = String::with_capacity(query.len());
        for (i, pair) in query.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((name, value)) if !value.is_empty() && self.is_sensitive(&decode(name)) => {
                    secrets.add(value);
                    out.push_str(name);
                    out.push('=');
                    out.push_str(MASK);
                }
                _ => out.push_str(pair),
            }
        }
        out
    }

    /// A URL with its userinfo password, and sensitive query and fragment
    /// parameters (`#access_token=…`), masked.
    pub fn url(&self, url: &str, secrets: &mut Secrets) -> String {
        // The userinfo first, on the whole URL: a raw '#', '/' or '?' in a
        // password (common in database URLs) then masks more, never less.
        let url = mask_userinfo(url, secrets);
        let (rest, fragment) = match url.split_once('#') {
            Some((rest, fragment)) => (rest, Some(fragment)),
            None => (url.as_str(), None),
        };
        let (base, query) = match rest.split_once('?') {
            Some((base, query)) => (base, Some(query)),
            None => (rest, None),
        };
        let mut out = base.to_owned();
        if let Some(query) = query {
            out.push('?');
            out.push_str(&self.query(query, secrets));
        }
        if let Some(fragment) = fragment {
            out.push('#');
            out.push_str(&self.query(fragment, secrets));
        }
        out
    }

    /// Masks, in place, the value of every sensitive key at any depth, and
    /// scrubs URLs found in string values.
    pub fn json(&self, value: &mut Value, secrets: &mut Secrets) {
        match value {
            Value::Object(map) => {
                for (key, value) in map.iter_mut() {
                    if self.is_sensitive(key) && !matches!(value, Value::Null) {
                        remember_json(value, secrets);
                        *value = Value::String(MASK.to_owned());
                    } else {
                        self.json(value, secrets);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|v| self.json(v, secrets)),
            Value::String(s) if s.contains("://") => *s = self.url(s, secrets),
            _ => {}
        }
    }

    /// Free text from the app (an error page): JSON is scrubbed by key, a
    /// form-encoded body by name; then every secret of the request is cut
    /// out wherever it appears.
    pub fn text(&self, text: &str, secrets: &mut Secrets) -> String {
        let trimmed = text.trim_start();
        let scrubbed = if trimmed.starts_with('{') || trimmed.starts_with('[') {
            match serde_json::from_str::<Value>(text) {
                Ok(mut value) => {
                    self.json(&mut value, secrets);
                    value.to_string()
                }
                Err(_) => text.to_owned(),
            }
        } else {
            text.to_owned()
        };
        secrets.redact(&scrubbed)
    }
}

/// `scheme://user:secret@host/…` → `scheme://user:********************@host/…`.
/// The last '@' ends the userinfo (a password may hold '#', '/' or '?').
fn mask_userinfo(url: &str, secrets: &mut Secrets) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_owned();
    };
    let (head, rest) = url.split_at(scheme_end + 3);
    let Some(at) = rest.rfind('@') else {
        return url.to_owned();
    };
    match rest[..at].find(':') {
        Some(colon) if colon + 1 < at => {
            secrets.add(&rest[colon + 1..at]);
            format!("{head}{}:{MASK}{}", &rest[..colon], &rest[at..])
        }
        _ => url.to_owned(),
    }
}

fn remember_json(value: &Value, secrets: &mut Secrets) {
    match value {
        Value::String(s) => secrets.add(s),
        Value::Number(n) => secrets.add(&n.to_string()),
        Value::Array(items) => items.iter().for_each(|v| remember_json(v, secrets)),
        Value::Object(map) => map.values().for_each(|v| remember_json(v, secrets)),
        _ => {}
    }
}

fn decode(name: &str) -> String {
    percent_encoding::percent_decode_str(&name.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn django_names_are_sensitive_in_any_case() {
        let s = Scrubber::default();
        for name in [
            "Authorization",
            "x-api-key",
            "csrftoken",
            "PASSWORD",
            "client_secret",
            "X-Hub-Signature",
            "sessionkey",
            "Cookie",
        ] {
            assert!(s.is_sensitive(name), "{name}");
        }
        for name in ["accept", "user-agent", "q", "page", "content-type"] {
            assert!(!s.is_sensitive(name), "{name}");
        }
    }

    #[test]
    fn extra_patterns_extend_and_bad_ones_are_refused() {
        let s = Scrubber::new(&["^sessionid$".into(), "csrf".into()]).unwrap();
        assert!(s.is_sensitive("SessionID"));
        assert!(s.is_sensitive("x-csrf"));
        assert!(!s.is_sensitive("session"));
        assert!(Scrubber::new(&["(".into()]).unwrap_err().contains("`(`"));
    }

    #[test]
    fn headers_mask_sensitive_values_and_always_cookies() {
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer abcd1234"));
        h.insert("cookie", HeaderValue::from_static("sid=s3ss10n; theme=dk"));
        h.insert("accept", HeaderValue::from_static("text/html"));
        h.append("x-thing", HeaderValue::from_static("a"));
        h.append("x-thing", HeaderValue::from_static("b"));
        let mut secrets = Secrets::default();
        let out = Scrubber::default().headers(&h, &mut secrets);
        assert_eq!(out["authorization"], MASK);
        assert_eq!(out["cookie"], MASK);
        assert_eq!(out["accept"], "text/html");
        assert_eq!(out["x-thing"], "a, b");
        assert_eq!(
            secrets.redact("token abcd1234, session s3ss10n, dk"),
            format!("token {MASK}, session {MASK}, dk")
        );
    }

    #[test]
    fn urls_in_any_header_are_scrubbed() {
        let mut h = HeaderMap::new();
        h.insert(
            "referer",
            HeaderValue::from_static("https://u:pw-1234@app.example/p?q=1&token=tk-5678#x"),
        );
        h.insert(
            "x-original-url",
            HeaderValue::from_static("/p?api_key=k-9999"),
        );
        let mut secrets = Secrets::default();
        let out = Scrubber::default().headers(&h, &mut secrets);
        assert_eq!(
            out["referer"],
            format!("https://u:{MASK}@app.example/p?q=1&token={MASK}#x")
        );
        assert_eq!(out["x-original-url"], format!("/p?api_key={MASK}"));
        assert_eq!(
            secrets.redact("pw-1234 tk-5678 k-9999"),
            format!("{MASK} {MASK} {MASK}")
        );
    }

    #[test]
    fn a_flood_of_cookies_costs_a_bounded_amount() {
        let cookie: String = (0..50_000).map(|i| format!("c{i}=value-{i}; ")).collect();
        let mut h = HeaderMap::new();
        h.insert("cookie", HeaderValue::from_str(&cookie).unwrap());
        let mut secrets = Secrets::default();
        let started = std::time::Instant::now();
        let out = Scrubber::default().headers(&h, &mut secrets);
        assert_eq!(out["cookie"], MASK);
        assert_eq!(secrets.0.len(), MAX_SECRETS);
        // Not a timing test: a quadratic scan takes seconds, this is linear.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn cuts_never_fall_inside_a_secret() {
        let mut secrets = Secrets::default();
        secrets.add("AAAA-BBBB");
        secrets.add("BBBB-CCCC");
        let text = b"x AAAA-BBBB-CCCC y";
        // A cut inside the second moves before it, which is inside the
        // first: before that too.
        assert_eq!(secrets.safe_cut(text, 14), 2);
        assert_eq!(secrets.safe_cut(text, 2), 2);
        assert_eq!(secrets.safe_cut(text, 16), 16);
        assert_eq!(secrets.safe_cut(text, 100), text.len());
    }

    #[test]
    fn queries_keep_everything_but_sensitive_values() {
        let s = Scrubber::default();
        let mut secrets = Secrets::default();
        assert_eq!(
            s.query(
                "q=shoes&api_key=K3Y5&%74oken=t0k3n&empty_pass=&x",
                &mut secrets
            ),
            format!("q=shoes&api_key={MASK}&%74oken={MASK}&empty_pass=&x")
        );
        assert_eq!(
            secrets.redact("K3Y5 t0k3n shoes"),
            format!("{MASK} {MASK} shoes")
        );
    }

    #[test]
    fn urls_lose_passwords_and_sensitive_parameters() {
        let s = Scrubber::default();
        let mut secrets = Secrets::default();
        assert_eq!(
            s.url(
                "https://u:hunter2@app.example/cb?state=ok&code=1#access_token=abc123&x=1",
                &mut secrets
            ),
            format!("https://u:{MASK}@app.example/cb?state=ok&code=1#access_token={MASK}&x=1")
        );
        assert_eq!(s.url("/plain/path", &mut secrets), "/plain/path");
        assert_eq!(
            s.url("redis://user@host/0", &mut secrets),
            "redis://user@host/0"
        );
    }

    #[test]
    fn json_keys_are_masked_at_any_depth() {
        let s = Scrubber::default();
        let mut secrets = Secrets::default();
        let mut v = serde_json::json!({
            "user": {"name": "ann", "Password": "pw-1234", "tokens": ["t-1111", "t-2222"]},
            "page": "https://app.example/?session_key=sk-9999&q=1",
            "n": null, "apiKey": null
        });
        s.json(&mut v, &mut secrets);
        assert_eq!(v["user"]["name"], "ann");
        assert_eq!(v["user"]["Password"], MASK);
        assert_eq!(v["user"]["tokens"], MASK);
        assert_eq!(v["apiKey"], Value::Null);
        assert_eq!(
            v["page"],
            format!("https://app.example/?session_key={MASK}&q=1")
        );
        assert_eq!(
            secrets.redact("pw-1234 t-2222 sk-9999"),
            format!("{MASK} {MASK} {MASK}")
        );
    }

    #[test]
    fn text_is_scrubbed_by_shape_then_by_known_secrets() {
        let s = Scrubber::default();
        let mut secrets = Secrets::default();
        secrets.add("hunter22");
        assert_eq!(
            s.text(
                "{\"secret\":\"zzzz9\",\"msg\":\"hunter22 failed\"}",
                &mut secrets
            ),
            format!("{{\"msg\":\"{MASK} failed\",\"secret\":\"{MASK}\"}}")
        );
        assert_eq!(
            s.text("<p>login hunter22 refused</p>", &mut secrets),
            format!("<p>login {MASK} refused</p>")
        );
        // Percent-encoded secrets are also found decoded.
        let mut secrets = Secrets::default();
        secrets.add("a%2Fb%2Bc-long");
        assert_eq!(secrets.redact("saw a/b+c-long"), format!("saw {MASK}"));
    }
}
