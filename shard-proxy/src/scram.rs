//! Server side of SCRAM-SHA-256 (RFC 5802/7677) for client logins.
//!
//! Why here: `postgres-protocol` only implements the client side. Passwords are turned into
//! salted verifiers (StoredKey/ServerKey) once, when users are loaded, and never logged;
//! the exchange compares proofs in constant time. Unknown users run the same exchange
//! against a random verifier so the reply does not reveal which names exist.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Iteration count used for verifiers (PostgreSQL's default).
pub const ITERATIONS: u32 = 4096;

/// A user's SCRAM verifier. `Debug` prints nothing secret.
#[derive(Clone)]
pub struct Verifier {
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Verifier(..)")
    }
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        // HMAC accepts keys of any length; this branch is unreachable in practice.
        Err(_) => return [0; 32],
    };
    m.update(data);
    m.finalize().into_bytes().into()
}

/// `N` random bytes from the operating system's CSPRNG.
///
/// Why it may fail: `getrandom` reports an error only when the OS has no entropy source at
/// all (no `getrandom(2)`, no `/dev/urandom`); a proxy cannot authenticate anyone safely on
/// such a machine, so callers treat it as fatal for the exchange at hand.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], ScramError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| ScramError::Entropy(e.to_string()))?;
    Ok(buf)
}

impl Verifier {
    /// Derives a verifier from a password with a fresh random salt.
    pub fn from_password(password: &str) -> Result<Verifier, ScramError> {
        Ok(Self::derive(
            password.as_bytes(),
            &random_bytes::<16>()?,
            ITERATIONS,
        ))
    }

    /// A verifier nobody can satisfy, for a user name that does not exist.
    ///
    /// Why the salt is derived, not random: a fresh salt per attempt would tell a prober
    /// which names exist (a real user's salt never changes). Like PostgreSQL's
    /// `scram_mock_salt`, the salt is a hash of the name and a secret `mock_key` that lives
    /// as long as the process, so repeated attempts for one unknown name see one salt.
    pub fn impossible(user: &str, mock_key: &[u8; 32]) -> Verifier {
        let mut h = Sha256::new();
        h.update(mock_key);
        h.update(user.as_bytes());
        let digest: [u8; 32] = h.finalize().into();
        Verifier {
            salt: digest[..16].to_vec(),
            iterations: ITERATIONS,
            // No password has this StoredKey: it is a keyed hash, not H(ClientKey).
            stored_key: hmac(mock_key, &digest),
            server_key: [0; 32],
        }
    }

    pub fn derive(password: &[u8], salt: &[u8], iterations: u32) -> Verifier {
        let mut salted = [0u8; 32];
        pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut salted);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key: [u8; 32] = Sha256::digest(client_key).into();
        let server_key = hmac(&salted, b"Server Key");
        Verifier {
            salt: salt.to_vec(),
            iterations,
            stored_key,
            server_key,
        }
    }
}

/// Why an exchange failed. Messages never include secrets.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("channel binding is not supported")]
    ChannelBinding,
    #[error("password authentication failed")]
    BadProof,
    #[error("no entropy source: {0}")]
    Entropy(String),
}

/// State between the server-first and client-final messages.
#[derive(Debug)]
pub struct ServerExchange {
    verifier: Verifier,
    client_first_bare: String,
    server_first: String,
    gs2_header: String,
    nonce: String,
}

impl ServerExchange {
    /// Handles client-first; returns the exchange and the server-first message to send.
    pub fn start(verifier: Verifier, client_first: &[u8]) -> Result<(Self, String), ScramError> {
        let text =
            std::str::from_utf8(client_first).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let flag = parts
            .next()
            .ok_or(ScramError::Malformed("missing gs2 flag"))?;
        let authzid = parts
            .next()
            .ok_or(ScramError::Malformed("missing authzid"))?;
        let bare = parts
            .next()
            .ok_or(ScramError::Malformed("missing client-first-bare"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(ScramError::Malformed("bad gs2 flag")),
        }
        let gs2_header = format!("{flag},{authzid},");
        let client_nonce = bare
            .split(',')
            .find_map(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("missing client nonce"))?;
        let server_nonce = B64.encode(random_bytes::<18>()?);
        let nonce = format!("{client_nonce}{server_nonce}");
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        Ok((
            ServerExchange {
                verifier,
                client_first_bare: bare.to_owned(),
                server_first: server_first.clone(),
                gs2_header,
                nonce,
            },
            server_first,
        ))
    }

    /// Verifies client-final; returns the server-final message (`v=...`).
    pub fn finish(self, client_final: &[u8]) -> Result<String, ScramError> {
        let text =
            std::str::from_utf8(client_final).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("missing proof"))?;
        let mut channel = None;
        let mut nonce = None;
        for attr in without_proof.split(',') {
            if let Some(c) = attr.strip_prefix("c=") {
                channel = Some(c);
            } else if let Some(r) = attr.strip_prefix("r=") {
                nonce = Some(r);
            }
        }
        let channel = channel.ok_or(ScramError::Malformed("missing channel binding"))?;
        if B64.decode(channel).ok().as_deref() != Some(self.gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if nonce != Some(self.nonce.as_str()) {
            return Err(ScramError::Malformed("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ScramError::Malformed("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ScramError::BadProof);
        }
        let auth_message = format!(
            "{},{},{}",
            self.client_first_bare, self.server_first, without_proof
        );
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
        let computed: [u8; 32] = Sha256::digest(&client_key).into();
        // Constant-time comparison.
        let diff = computed
            .iter()
            .zip(self.verifier.stored_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok(format!("v={}", B64.encode(server_signature)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    #[test]
    fn accepts_postgres_protocol_client() {
        let verifier = Verifier::from_password("s3cret").expect("entropy");
        let mut client = ScramSha256::new(b"s3cret", ChannelBinding::unsupported());
        let (ex, server_first) = ServerExchange::start(verifier, client.message()).expect("first");
        client
            .update(server_first.as_bytes())
            .expect("client update");
        let server_final = ex.finish(client.message()).expect("proof ok");
        client
            .finish(server_final.as_bytes())
            .expect("server verified");
    }

    #[test]
    fn rejects_wrong_password() {
        let verifier = Verifier::from_password("right").expect("entropy");
        let mut client = ScramSha256::new(b"wrong", ChannelBinding::unsupported());
        let (ex, server_first) = ServerExchange::start(verifier, client.message()).expect("first");
        client
            .update(server_first.as_bytes())
            .expect("client update");
        assert_eq!(ex.finish(client.message()), Err(ScramError::BadProof));
    }

    #[test]
    fn rejects_garbage() {
        let v = Verifier::impossible("nobody", &[9; 32]);
        assert!(ServerExchange::start(v.clone(), b"\xff\xfe").is_err());
        assert!(ServerExchange::start(v.clone(), b"n,,").is_err());
        assert!(ServerExchange::start(v, b"p=tls-server-end-point,,n=,r=abc").is_err());
    }

    /// An unknown name gets the same salt on every attempt (a per-attempt salt would reveal
    /// that the name does not exist), and different names get different salts.
    #[test]
    fn unknown_user_salt_is_stable_per_name() {
        let key = [3; 32];
        let a1 = Verifier::impossible("mallory", &key);
        let a2 = Verifier::impossible("mallory", &key);
        let b = Verifier::impossible("trudy", &key);
        assert_eq!(a1.salt, a2.salt);
        assert_ne!(a1.salt, b.salt);
        assert_eq!(a1.salt.len(), 16);
    }
}
