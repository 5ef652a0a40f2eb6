//! Standard Webhooks signatures: `webhook-signature: v1,<base64 HMAC-SHA256
//! of "id.timestamp.body">`, with the secret given as `whsec_<base64>`.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// A decoded signing secret.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// Parses `whsec_<base64>` (the prefix is optional, as in the reference
    /// libraries).
    pub fn parse(text: &str) -> Result<Secret, String> {
        let encoded = text.trim().strip_prefix("whsec_").unwrap_or(text.trim());
        let bytes = STANDARD.decode(encoded).map_err(|_| {
            "expected `whsec_` followed by base64 (as Standard Webhooks secrets are)".to_owned()
        })?;
        if bytes.is_empty() {
            return Err("the secret is empty".into());
        }
        Ok(Secret(bytes))
    }

    /// The `webhook-signature` value for one attempt.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        // HMAC accepts keys of any length: `new_from_slice` cannot fail here.
        let mut mac = match Hmac::<Sha256>::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => return String::new(),
        };
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_test_vector() {
        let secret = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let signature = secret.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn bad_secrets_are_refused() {
        assert!(Secret::parse("whsec_not base64!").is_err());
        assert!(Secret::parse("whsec_").is_err());
    }
}
