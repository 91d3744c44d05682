//! How the proxy secures each backend connection: the `sslmode` in force, the rustls client
//! configuration it calls for (with the CA certificates it names), and whether the server
//! may ask for a cleartext or MD5 password.
//!
//! Why here: start-up, RELOAD and the kit's secret check must read the CA files the same
//! way (see `resolve.rs`), and one configuration's pools share one rustls configuration per
//! CA file. libpq's rules are followed so a URL means what it means to `psql`: `prefer` and
//! `require` encrypt without checking the certificate — unless a CA is configured for the
//! backend, which makes `require` check the chain like `verify-ca`; `verify-full` also
//! checks that the certificate names the URL's host.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use super::target::{BackendTarget, SslMode};
use super::{BackendConfig, ProxyConfig};

/// A backend's TLS settings that cannot be used, naming the key that holds them.
#[derive(Debug, thiserror::Error)]
#[error("configuration key `{key}`: {message}")]
pub struct BackendTlsError {
    pub key: String,
    pub message: String,
}

/// How the proxy connects to and authenticates with one backend.
#[derive(Clone)]
pub struct BackendSecurity {
    /// The mode in force (the URL's `sslmode`, else `backend.sslmode`; `require` with a CA
    /// configured is `verify-ca`, as in libpq).
    pub sslmode: SslMode,
    /// The TLS client configuration; `None` for `disable`.
    pub tls: Option<Arc<ClientConfig>>,
    /// Whether a cleartext or MD5 password request from the server is answered.
    pub allow_insecure_auth: bool,
    /// The CA certificates (DER), so a reload can tell whether anything changed.
    ca: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl std::fmt::Debug for BackendSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendSecurity")
            .field("sslmode", &self.sslmode)
            .field("allow_insecure_auth", &self.allow_insecure_auth)
            .field("ca_certs", &self.ca.as_ref().map(|c| c.len()))
            .finish()
    }
}

impl BackendSecurity {
    /// Plaintext, SCRAM or trust only: the defaults.
    pub fn plaintext() -> BackendSecurity {
        BackendSecurity {
            sslmode: SslMode::Disable,
            tls: None,
            allow_insecure_auth: false,
            ca: None,
        }
    }

    /// Whether a connection made with `self` is as good as one made with `other` (a reload
    /// keeps a pool only then).
    pub fn same_as(&self, other: &BackendSecurity) -> bool {
        self.sslmode == other.sslmode
            && self.allow_insecure_auth == other.allow_insecure_auth
            && self.ca == other.ca
    }
}

/// The security of every backend URL in `config` (the auth database and each shard), keyed
/// by URL. Reads each CA file once.
pub fn backend_security(
    config: &ProxyConfig,
) -> Result<HashMap<String, BackendSecurity>, BackendTlsError> {
    let mut cas: HashMap<PathBuf, Arc<Vec<CertificateDer<'static>>>> = HashMap::new();
    let mut out = HashMap::new();
    let urls = std::iter::once(("auth_database.url".to_owned(), &config.auth_database.url)).chain(
        config
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("shards[{i}].url"), &s.url)),
    );
    for (key, url) in urls {
        let target = BackendTarget::parse(url).map_err(|message| BackendTlsError {
            key: key.clone(),
            message,
        })?;
        let security = for_target(&config.backend, &target, &key, &mut cas)?;
        out.insert(url.clone(), security);
    }
    Ok(out)
}

/// The CA file that applies to `target`: the URL's `sslrootcert`, else
/// `backend.sslrootcert`.
pub fn ca_file<'a>(backend: &'a BackendConfig, target: &'a BackendTarget) -> Option<&'a Path> {
    target
        .sslrootcert
        .as_deref()
        .or(backend.sslrootcert.as_deref())
}

/// The security of one backend `url` (e.g. a shard known only from the stored ring);
/// `key` names where the URL came from in errors.
pub fn security_for_url(
    backend: &BackendConfig,
    key: &str,
    url: &str,
) -> Result<BackendSecurity, BackendTlsError> {
    let target = BackendTarget::parse(url).map_err(|message| BackendTlsError {
        key: key.to_owned(),
        message,
    })?;
    for_target(backend, &target, key, &mut HashMap::new())
}

fn for_target(
    backend: &BackendConfig,
    target: &BackendTarget,
    key: &str,
    cas: &mut HashMap<PathBuf, Arc<Vec<CertificateDer<'static>>>>,
) -> Result<BackendSecurity, BackendTlsError> {
    let err = |message: String| BackendTlsError {
        key: key.to_owned(),
        message,
    };
    let mut sslmode = target.sslmode.unwrap_or(backend.sslmode);
    let ca_path = ca_file(backend, target);
    if sslmode == SslMode::Require && ca_path.is_some() {
        sslmode = SslMode::VerifyCa;
    }
    let mut security = BackendSecurity {
        sslmode,
        allow_insecure_auth: backend.allow_insecure_auth,
        ..BackendSecurity::plaintext()
    };
    security.tls = match (sslmode, ca_path) {
        (SslMode::Disable, _) => None,
        (SslMode::Prefer, _) | (SslMode::Require, _) => Some(no_verification().map_err(err)?),
        (_, None) => {
            return Err(err(format!(
                "sslmode={sslmode} needs a CA: add sslrootcert=/path/ca.pem to the URL or set \
                 backend.sslrootcert"
            )))
        }
        (_, Some(path)) => {
            let certs = match cas.get(path) {
                Some(c) => c.clone(),
                None => {
                    let c = Arc::new(read_ca(path).map_err(err)?);
                    cas.insert(path.to_owned(), c.clone());
                    c
                }
            };
            let tls = verifying(&certs, sslmode == SslMode::VerifyFull).map_err(err)?;
            security.ca = Some(certs);
            Some(tls)
        }
    };
    Ok(security)
}

fn read_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("CA file {}: {e}", path.display()))?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("CA file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("CA file {} holds no certificate", path.display()));
    }
    Ok(certs)
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn builder() -> Result<rustls::ConfigBuilder<ClientConfig, rustls::WantsVerifier>, String> {
    ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))
}

/// verify-full (chain and host name) or verify-ca (chain only) against `certs`.
fn verifying(
    certs: &[CertificateDer<'static>],
    check_name: bool,
) -> Result<Arc<ClientConfig>, String> {
    let mut roots = RootCertStore::empty();
    for c in certs {
        roots
            .add(c.clone())
            .map_err(|e| format!("CA certificate: {e}"))?;
    }
    let roots = Arc::new(roots);
    let config = if check_name {
        builder()?
            .with_root_certificates(roots)
            .with_no_client_auth()
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| format!("CA certificate: {e}"))?;
        builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
            .with_no_client_auth()
    };
    Ok(Arc::new(config))
}

/// prefer/require without a CA: encryption against passive listeners, no authentication of
/// the server (libpq's meaning of these modes).
fn no_verification() -> Result<Arc<ClientConfig>, String> {
    let provider = provider();
    let config = builder()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// verify-ca: the chain must lead to the CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// prefer/require: any certificate; the handshake signatures are still checked.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
