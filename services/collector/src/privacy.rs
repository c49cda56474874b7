//! Privacy at the edge: raw user ids never leave the collector, and optional
//! redaction of e-mail addresses and phone numbers in free text.

use flywheel_core::records::{Interaction, InteractionPayload};
use hmac::{Hmac, Mac};
use regex::Regex;
use sha2::Sha256;

/// Keyed pseudonymisation of user ids: HMAC-SHA256 over tenant and raw id
/// with a secret that is stable across restarts, hex encoded. Without the
/// secret the mapping cannot be reversed or recomputed; the tenant in the
/// input keeps one person's ids unlinkable across tenants.
#[derive(Clone)]
pub struct Pseudonymizer {
    mac: Hmac<Sha256>,
}

impl std::fmt::Debug for Pseudonymizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pseudonymizer(<secret>)")
    }
}

/// Shortest accepted secret, in bytes.
pub const MIN_SECRET_BYTES: usize = 16;

impl Pseudonymizer {
    /// A pseudonymiser keyed with `secret` (at least [`MIN_SECRET_BYTES`]).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!("the HMAC secret must be at least {MIN_SECRET_BYTES} bytes, got {}", secret.len()));
        }
        let mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|e| e.to_string())?;
        Ok(Pseudonymizer { mac })
    }

    /// The pseudonymous id of a raw user id within a tenant (64 hex chars).
    pub fn pseudonymize(&self, tenant: &str, raw_user_id: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(tenant.as_bytes());
        mac.update(&[0]);
        mac.update(raw_user_id.as_bytes());
        flywheel_core::hex(&mac.finalize().into_bytes())
    }
}

/// Counts of what redaction replaced.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Redactions {
    /// E-mail addresses replaced.
    pub emails: u64,
    /// Phone numbers replaced.
    pub phones: u64,
}

/// Replaces e-mail addresses and phone numbers in every free-text field of
/// an interaction with `[EMAIL]` / `[PHONE]`.
#[derive(Debug, Clone)]
pub struct Redactor {
    email: Regex,
    phone: Regex,
}

impl Default for Redactor {
    fn default() -> Self {
        Redactor {
            email: Regex::new(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}").expect("valid regex"),
            // International or national numbers: optional +country, 9–15
            // digits with common separators; short numbers (code, versions)
            // do not match.
            phone: Regex::new(r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){2,4}")
                .expect("valid regex"),
        }
    }
}

impl Redactor {
    fn redact_text(&self, text: &mut String, counts: &mut Redactions) {
        let emails = self.email.find_iter(text).count() as u64;
        if emails > 0 {
            *text = self.email.replace_all(text, "[EMAIL]").into_owned();
            counts.emails += emails;
        }
        let phones =
            self.phone.find_iter(text).filter(|m| m.as_str().chars().filter(char::is_ascii_digit).count() >= 9).count()
                as u64;
        if phones > 0 {
            *text = self
                .phone
                .replace_all(text, |c: &regex::Captures<'_>| {
                    let m = &c[0];
                    if m.chars().filter(char::is_ascii_digit).count() >= 9 {
                        "[PHONE]".to_string()
                    } else {
                        m.to_string()
                    }
                })
                .into_owned();
            counts.phones += phones;
        }
    }

    /// Redacts prompt, completion, edited text, follow-up detail and attribute values.
    pub fn redact(&self, event: &mut Interaction) -> Redactions {
        let mut counts = Redactions::default();
        match &mut event.payload {
            InteractionPayload::Shown(s) => {
                self.redact_text(&mut s.prompt, &mut counts);
                self.redact_text(&mut s.completion, &mut counts);
            }
            InteractionPayload::Edited(e) => {
                if let Some(t) = &mut e.final_text {
                    self.redact_text(t, &mut counts);
                }
            }
            InteractionPayload::FollowUp(f) => {
                if let Some(d) = &mut f.detail {
                    self.redact_text(d, &mut counts);
                }
            }
            _ => {}
        }
        for v in event.attributes.values_mut() {
            self.redact_text(v, &mut counts);
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudonyms_are_stable_keyed_and_tenant_scoped() {
        let p = Pseudonymizer::new(b"0123456789abcdef").unwrap();
        let a = p.pseudonymize("acme", "alice");
        assert_eq!(a, p.pseudonymize("acme", "alice"));
        assert_eq!(a.len(), 64);
        assert_ne!(a, p.pseudonymize("other", "alice"));
        assert_ne!(a, Pseudonymizer::new(b"another-secret-16b").unwrap().pseudonymize("acme", "alice"));
        assert!(!a.contains("alice"));
        assert!(Pseudonymizer::new(b"short").is_err());
    }

    #[test]
    fn emails_and_phone_numbers_are_redacted_but_code_is_not() {
        let r = Redactor::default();
        let mut counts = Redactions::default();
        let mut t = "mail bob.smith@corp.example.com or call +44 20 7946 0958; x = f(3, 14)".to_string();
        r.redact_text(&mut t, &mut counts);
        assert_eq!(t, "mail [EMAIL] or call [PHONE]; x = f(3, 14)");
        assert_eq!(counts, Redactions { emails: 1, phones: 1 });
        let mut code = "version 1.2.3 and 2026-11-23".to_string();
        r.redact_text(&mut code, &mut counts);
        assert_eq!(code, "version 1.2.3 and 2026-11-23");
    }
}
