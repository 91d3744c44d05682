//! Local JWT verification with the auth daemon's public key.
//!
//! The algorithm is pinned to EdDSA: a token whose header says `none`, `HS256` or anything
//! else is rejected before any key is consulted, which closes the classic algorithm
//! confusion attacks. Expiry is enforced with a small leeway for clock skew.
//!
//! Verifying an Ed25519 signature costs tens of microseconds, which matters on hot read
//! paths; verified tokens are remembered (bounded, keyed by the whole token string) and
//! only their expiry is re-checked on later use.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use taskflow_contracts::Claims;

const LEEWAY_SECS: u64 = 5;
const CACHE_CAPACITY: usize = 10_000;

/// Why a token was refused (never shown in detail to clients).
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("invalid token: {0}")]
    Invalid(String),
    #[error("token expired")]
    Expired,
    #[error("token subject is not a user id")]
    BadSubject,
}

pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    /// Verified tokens → (expiry, user id): a hit costs no allocation.
    cache: Mutex<HashMap<String, (i64, i64)>>,
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

impl Verifier {
    /// Reads the SPKI PEM public key named by `jwt_public_key_file`.
    pub fn load(name_or_path: &str) -> Result<Self, String> {
        let pem =
            taskflow_kit::secrets::read_secret_bytes(name_or_path).map_err(|e| e.to_string())?;
        Self::from_pem(&pem)
    }

    pub fn from_pem(pem: &[u8]) -> Result<Self, String> {
        let text = std::str::from_utf8(pem).map_err(|_| "not a PEM file".to_owned())?;
        if !text.contains("-----BEGIN PUBLIC KEY-----") {
            return Err("expected a `PUBLIC KEY` PEM block (Ed25519 SPKI)".into());
        }
        let key =
            DecodingKey::from_ed_pem(pem).map_err(|e| format!("not an Ed25519 public key: {e}"))?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.algorithms = vec![Algorithm::EdDSA];
        validation.leeway = LEEWAY_SECS;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Ok(Verifier {
            key,
            validation,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Verifies `token` and returns its user id.
    pub fn verify(&self, token: &str) -> Result<i64, TokenError> {
        self.verify_until(token).map(|(id, _)| id)
    }

    /// Verifies `token` and returns its user id and expiry (Unix seconds): a WebSocket
    /// stays open only until its token expires.
    pub fn verify_until(&self, token: &str) -> Result<(i64, i64), TokenError> {
        let leeway = i64::try_from(LEEWAY_SECS).unwrap_or(0);
        if let Some((exp, id)) = self.cache.lock().ok().and_then(|c| c.get(token).copied()) {
            if exp + leeway < now_secs() {
                return Err(TokenError::Expired);
            }
            return Ok((id, exp));
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid(e.to_string()),
            },
        )?;
        let id = data.claims.user_id().ok_or(TokenError::BadSubject)?;
        if let Ok(mut c) = self.cache.lock() {
            if c.len() >= CACHE_CAPACITY {
                c.clear();
            }
            c.insert(token.to_owned(), (data.claims.exp, id));
        }
        Ok((id, data.claims.exp))
    }
}
