//! The token signing key: loading, JWKS publication and key-pair generation.
//!
//! Tokens are signed with Ed25519 (JWS `EdDSA`) so that verifiers — the gateway — need only
//! the public key; a leaked gateway host cannot mint tokens. The private key arrives as a
//! PKCS#8 PEM file through the secret-file rules. The public half is derived from it (no
//! second file to keep in sync) and published as a JWKS so other services can fetch it.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{DecodingKey, EncodingKey};
use ring::signature::{Ed25519KeyPair, KeyPair as _};

/// DER prefix of an Ed25519 SubjectPublicKeyInfo; the 32 key bytes follow.
const SPKI_ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Secret(#[from] taskflow_kit::secrets::SecretError),
    #[error("not a PEM file: {0}")]
    Pem(#[from] pem::PemError),
    #[error("expected a `PRIVATE KEY` (PKCS#8) PEM block, found `{0}`")]
    WrongBlock(String),
    #[error("not an Ed25519 PKCS#8 private key: {0}")]
    Rejected(String),
    #[error("cannot write key file: {0}")]
    Io(#[from] std::io::Error),
}

/// What the daemon signs and verifies with.
pub struct SigningKeys {
    pub encoding: EncodingKey,
    pub decoding: DecodingKey,
    /// Key id: the first 16 base64url characters of SHA-256 of the public key.
    pub kid: String,
    /// Raw 32-byte public key.
    pub public: Vec<u8>,
}

impl SigningKeys {
    /// Reads and checks the private key named by `jwt_private_key_file`.
    pub fn load(name_or_path: &str) -> Result<Self, KeyError> {
        let bytes = taskflow_kit::secrets::read_secret_bytes(name_or_path)?;
        Self::from_pem(&bytes)
    }

    pub fn from_pem(pem_bytes: &[u8]) -> Result<Self, KeyError> {
        let block = pem::parse(pem_bytes)?;
        if block.tag() != "PRIVATE KEY" {
            return Err(KeyError::WrongBlock(block.tag().to_owned()));
        }
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(block.contents())
            .map_err(|e| KeyError::Rejected(e.to_string()))?;
        let public = pair.public_key().as_ref().to_vec();
        let digest = ring::digest::digest(&ring::digest::SHA256, &public);
        let mut kid = URL_SAFE_NO_PAD.encode(digest.as_ref());
        kid.truncate(16);
        Ok(SigningKeys {
            encoding: EncodingKey::from_ed_der(block.contents()),
            decoding: DecodingKey::from_ed_der(&public),
            kid,
            public,
        })
    }

    /// The JWKS document served at `/.well-known/jwks.json`.
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({
            "keys": [{
                "kty": "OKP",
                "crv": "Ed25519",
                "alg": "EdDSA",
                "use": "sig",
                "kid": self.kid,
                "x": URL_SAFE_NO_PAD.encode(&self.public),
            }]
        })
    }

    /// The public key as SPKI PEM (what the gateway's `jwt_public_key_file` holds).
    pub fn public_pem(&self) -> String {
        let mut der = SPKI_ED25519_PREFIX.to_vec();
        der.extend_from_slice(&self.public);
        pem::encode(&pem::Pem::new("PUBLIC KEY", der))
    }
}

/// A fresh key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_pem_pair() -> Result<(String, String), KeyError> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| KeyError::Rejected(e.to_string()))?;
    let private = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
    let keys = SigningKeys::from_pem(private.as_bytes())?;
    Ok((private, keys.public_pem()))
}

/// Writes `jwt-private.pem` (mode 0600) and `jwt-public.pem` into `dir` unless the
/// private key already exists; returns whether new keys were written.
pub fn generate_into(dir: &std::path::Path) -> Result<bool, KeyError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir)?;
    let private_path = dir.join("jwt-private.pem");
    if private_path.exists() {
        return Ok(false);
    }
    let (private, public) = generate_pem_pair()?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&private_path)?;
    f.write_all(private.as_bytes())?;
    std::fs::write(dir.join("jwt-public.pem"), public)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn generated_pair_signs_and_verifies() {
        let (private, public) = generate_pem_pair().unwrap();
        let keys = SigningKeys::from_pem(private.as_bytes()).unwrap();
        let claims = serde_json::json!({"sub": "1", "exp": 4_000_000_000u64});
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::EdDSA),
            &claims,
            &keys.encoding,
        )
        .unwrap();
        let dec = DecodingKey::from_ed_pem(public.as_bytes()).unwrap();
        let v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        let got = jsonwebtoken::decode::<serde_json::Value>(&token, &dec, &v).unwrap();
        assert_eq!(got.claims["sub"], "1");
        assert_eq!(keys.jwks()["keys"][0]["crv"], "Ed25519");
    }

    #[test]
    fn rejects_non_keys() {
        assert!(SigningKeys::from_pem(b"hello").is_err());
        let (_, public) = generate_pem_pair().unwrap();
        assert!(matches!(
            SigningKeys::from_pem(public.as_bytes()),
            Err(KeyError::WrongBlock(_))
        ));
    }
}
