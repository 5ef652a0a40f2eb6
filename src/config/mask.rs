//! The effective configuration as TOML with secrets masked, for `check-config`,
//! and URLs with their passwords masked, for error messages. Both use the one
//! [`Scrubber`](crate::scrub::Scrubber): a key is secret when its name is.

use super::Config;
use crate::scrub::{Scrubber, Secrets};

/// Renders `config` as TOML, with every secret-looking value masked (names
/// matched by Django's pattern and `errors.sensitive_names`).
pub fn masked_toml(config: &Config) -> String {
    let scrubber = Scrubber::new(&config.errors.sensitive_patterns()).unwrap_or_default();
    let mut value =
        toml::Value::try_from(config).unwrap_or_else(|_| toml::Value::Table(Default::default()));
    mask_value(&scrubber, None, &mut value);
    toml::to_string_pretty(&value).unwrap_or_default()
}

fn mask_value(scrubber: &Scrubber, key: Option<&str>, value: &mut toml::Value) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table.iter_mut() {
                mask_value(scrubber, Some(k), v);
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(|v| mask_value(scrubber, key, v)),
        toml::Value::String(s) => {
            if key.is_some_and(|k| scrubber.is_sensitive(k)) && !s.is_empty() {
                *s = crate::scrub::MASK.to_owned();
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
    if !s.contains("://") {
        return s.to_owned();
    }
    Scrubber::default().url(s, &mut Secrets::default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scrub::MASK;

    #[test]
    fn url_passwords_are_masked() {
        assert_eq!(
            mask_url_password("postgres://app:hunter2@db:5432/app"),
            format!("postgres://app:{MASK}@db:5432/app")
        );
        assert_eq!(
            mask_url_password("postgres://app:hun#ter/2@db:5432/app?sslpassword=x"),
            format!("postgres://app:{MASK}@db:5432/app?sslpassword={MASK}")
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
        mask_value(&Scrubber::default(), None, &mut v);
        assert_eq!(v["a"]["password"].as_str(), Some(MASK));
        assert_eq!(v["a"]["api_token"].as_str(), Some(MASK));
        assert_eq!(v["a"]["name"].as_str(), Some("y"));
    }
}
