//! The effective configuration as TOML with secrets masked, for `check-config`.

use super::Config;

/// What a masked value is replaced with (Django's cleansed substitute).
pub const MASK: &str = "********************";

/// Key fragments that mark a value as secret (Django's sensitive pattern).
const SECRET_FRAGMENTS: [&str; 8] = [
    "api",
    "auth",
    "token",
    "key",
    "secret",
    "pass",
    "signature",
    "cookie",
];

/// Renders `config` as TOML, with every secret-looking value masked.
pub fn masked_toml(config: &Config) -> String {
    let mut value =
        toml::Value::try_from(config).unwrap_or_else(|_| toml::Value::Table(Default::default()));
    mask_value(None, &mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    SECRET_FRAGMENTS.iter().any(|f| key.contains(f))
}

fn mask_value(key: Option<&str>, value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                mask_value(Some(k), v);
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| mask_value(key, v)),
        toml::Value::String(s) => {
            if key.is_some_and(is_secret_key) && !s.is_empty() {
                *s = MASK.to_owned();
            } else {
                *s = mask_url_password(s);
            }
        }
        _ => {}
    }
}

/// Masks the password of `scheme://user:secret@host/…` and the values of
/// secret-named query parameters (`?password=…`, `sslpassword`, `token`…).
/// When the URL is odd (a `#` or `/` in the password), more is masked rather
/// than less.
pub fn mask_url_password(s: &str) -> String {
    let Some(scheme_end) = s.find("://") else {
        return s.to_owned();
    };
    let (head, rest) = s.split_at(scheme_end + 3);
    // The last '@' ends the userinfo: a password may contain '#', '/', '?'.
    let rest = match rest.rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{}:{MASK}{}", &rest[..colon], &rest[at..]),
            None => rest.to_owned(),
        },
        None => rest.to_owned(),
    };
    let rest = match rest.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((key, value)) if !value.is_empty() && is_secret_key(key) => {
                        format!("{key}={MASK}")
                    }
                    _ => param.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => rest,
    };
    format!("{head}{rest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_password("postgres://app:hunter2@db:5432/app"),
            format!("postgres://app:{MASK}@db:5432/app")
        );
        assert_eq!(
            mask_url_password("http://127.0.0.1:8080"),
            "http://127.0.0.1:8080"
        );
        assert_eq!(
            mask_url_password("redis://user@host/0"),
            "redis://user@host/0"
        );
    }

    #[test]
    fn secret_keys_are_masked() {
        let mut v: toml::Value =
            toml::from_str("[a]\npassword = \"x\"\nname = \"y\"\napi_token = \"z\"").unwrap();
        mask_value(None, &mut v);
        assert_eq!(v["a"]["password"].as_str(), Some(MASK));
        assert_eq!(v["a"]["api_token"].as_str(), Some(MASK));
        assert_eq!(v["a"]["name"].as_str(), Some("y"));
    }
}
