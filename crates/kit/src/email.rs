//! The one definition of "an email address TaskFlow can mail".
//!
//! The notify daemon hands addresses to lettre; the auth daemon decides which addresses
//! users may register. If the two disagreed, a user could register an address the mailer
//! then refuses on every event (issue 10: a local part over 64 characters, or one with a
//! `"`, kept the notify daemon retrying one event forever). So both call [`mail_address`],
//! which is lettre's own parser plus the two limits the SMTP transport adds on top of it.

use std::fmt;

pub use lettre::Address;

/// Longest address we accept (RFC 5321 path limit minus the angle brackets).
pub const MAX_LEN: usize = 254;

/// Why an address cannot be mailed. The message is safe to show to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmailError {
    /// lettre's parser refuses it (bad local part — over 64 characters, a stray `"` —,
    /// bad domain, no `@`).
    Syntax(lettre::address::AddressError),
    /// Non-ASCII: lettre refuses to send it to a server without SMTPUTF8, and we cannot
    /// know the relay's extensions at registration time.
    NotAscii,
    /// Longer than [`MAX_LEN`].
    TooLong,
}

impl fmt::Display for EmailError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EmailError::Syntax(e) => write!(f, "not a deliverable email address ({e})"),
            EmailError::NotAscii => f.write_str("must contain ASCII characters only"),
            EmailError::TooLong => write!(f, "must be at most {MAX_LEN} characters"),
        }
    }
}

impl std::error::Error for EmailError {}

/// Parses `s` exactly as the mailer will: `Ok` means lettre builds the envelope and the
/// SMTP transport sends it to any server.
pub fn mail_address(s: &str) -> Result<Address, EmailError> {
    if s.len() > MAX_LEN {
        return Err(EmailError::TooLong);
    }
    if !s.is_ascii() {
        return Err(EmailError::NotAscii);
    }
    s.parse::<Address>().map_err(EmailError::Syntax)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_addresses() {
        for ok in ["user@example.com", "a.b+c@x.io", "x_y-z@sub.example.org"] {
            assert!(mail_address(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_what_the_mailer_refuses() {
        let long_local = format!("{}@example.com", "a".repeat(65));
        for bad in [
            long_local.as_str(),
            "a\"b@example.com",
            "no-at-sign",
            "a b@example.com",
            "user@",
            "jürgen@example.com",
        ] {
            assert!(mail_address(bad).is_err(), "{bad}");
        }
        let long = format!("a@{}.com", "b".repeat(MAX_LEN));
        assert_eq!(mail_address(&long), Err(EmailError::TooLong));
        // 64 characters is the limit, not over it.
        assert!(mail_address(&format!("{}@example.com", "a".repeat(64))).is_ok());
    }
}
