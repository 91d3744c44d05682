//! Secrets come from files, never from configuration values or the Nix store.
//!
//! A `*_file` key holds either an absolute path or a bare credential name. Bare names are
//! looked up in `$CREDENTIALS_DIRECTORY`, where systemd's `LoadCredential=` puts them
//! (readable only by the service), and otherwise relative to the working directory.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("secret file {path}: {source}")]
pub struct SecretError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Where the secret named `name_or_path` lives.
pub fn secret_path(name_or_path: &str) -> PathBuf {
    let p = Path::new(name_or_path);
    if p.is_absolute() {
        return p.to_owned();
    }
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join(p),
        _ => p.to_owned(),
    }
}

/// Reads a secret, dropping one trailing newline (editors add one; passwords rarely end in one).
pub fn read_secret(name_or_path: &str) -> Result<String, SecretError> {
    let path = secret_path(name_or_path);
    let mut text = std::fs::read_to_string(&path).map_err(|source| SecretError {
        path: path.clone(),
        source,
    })?;
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    Ok(text)
}

/// Reads a secret's raw bytes (keys in PEM or DER).
pub fn read_secret_bytes(name_or_path: &str) -> Result<Vec<u8>, SecretError> {
    let path = secret_path(name_or_path);
    std::fs::read(&path).map_err(|source| SecretError { path, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_path_and_trailing_newline() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("pw");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(read_secret(f.to_str().unwrap()).unwrap(), "s3cret");
    }

    #[test]
    fn missing_secret_names_the_path() {
        let err = read_secret("/nonexistent/dir/pw").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/dir/pw"), "{err}");
    }
}
