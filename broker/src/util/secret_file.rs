//! Files that hold secrets (passwords, tokens, NATS credentials, private
//! keys): where they are, reading them fresh at each use, and warning when
//! others may read them.
//!
//! A secret never comes from the command line (every process on the node
//! can read `/proc/*/cmdline`) and never reaches a log line or the status
//! document: only its path does. A relative path is looked up in systemd's
//! credential directory (`$CREDENTIALS_DIRECTORY`, set for units with
//! `LoadCredential=`), so `password_file = "nats-password"` works with
//! `LoadCredential=nats-password:/etc/holdfast/nats-password`.

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The environment variable systemd sets to the unit's credential directory.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

/// A file holding a secret, read again each time it is needed so that a
/// rotated credential is picked up at the next connect.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretFile {
    path: PathBuf,
}

/// Why a secret file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SecretFileError {
    #[error("{path:?} is relative and $CREDENTIALS_DIRECTORY is not set (give an absolute path, or run under systemd with LoadCredential=)")]
    RelativeWithoutCredentialsDirectory { path: PathBuf },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is empty")]
    Empty { path: PathBuf },
}

impl SecretFile {
    /// Resolves `configured` (absolute, or relative to the credential
    /// directory `credentials_directory`).
    pub fn resolve(
        configured: &Path,
        credentials_directory: Option<&Path>,
    ) -> Result<SecretFile, SecretFileError> {
        let path = if configured.is_absolute() {
            configured.to_path_buf()
        } else {
            match credentials_directory {
                Some(directory) => directory.join(configured),
                None => {
                    return Err(SecretFileError::RelativeWithoutCredentialsDirectory {
                        path: configured.to_path_buf(),
                    })
                }
            }
        };
        Ok(SecretFile { path })
    }

    /// Resolves `configured` against the process's `$CREDENTIALS_DIRECTORY`.
    pub fn from_config(configured: &Path) -> Result<SecretFile, SecretFileError> {
        let directory = std::env::var_os(CREDENTIALS_DIRECTORY).map(PathBuf::from);
        SecretFile::resolve(configured, directory.as_deref())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file, for PEM blocks and credential files.
    pub fn read(&self) -> Result<String, SecretFileError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| SecretFileError::Read {
            path: self.path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(SecretFileError::Empty {
                path: self.path.clone(),
            });
        }
        Ok(text)
    }

    /// The file's first line without its line ending, for a password or a
    /// token (`echo secret > file` adds a newline that is not part of it).
    pub fn read_line(&self) -> Result<String, SecretFileError> {
        let text = self.read()?;
        let line = text.lines().next().unwrap_or_default();
        Ok(line.trim_end_matches('\r').to_string())
    }

    /// A warning when users other than the file's owner and group may read
    /// it; `None` when only they can (or the file cannot be examined, which
    /// reading it will report).
    pub fn exposure_warning(&self, key: &str) -> Option<String> {
        readable_by_others(&self.path).then(|| {
            format!(
                "{key}: {} is readable by every user on this machine; restrict it (chmod o-r)",
                self.path.display()
            )
        })
    }
}

/// Whether `path`'s mode lets any user read it.
pub fn readable_by_others(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|metadata| metadata.mode() & 0o004 != 0)
        .unwrap_or(false)
}

impl fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretFile({})", self.path.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn relative_paths_need_the_credentials_directory() {
        let error = SecretFile::resolve(Path::new("nats-password"), None).unwrap_err();
        assert!(
            error.to_string().contains("CREDENTIALS_DIRECTORY"),
            "{error}"
        );
        let file = SecretFile::resolve(
            Path::new("nats-password"),
            Some(Path::new("/run/credentials/holdfastd.service")),
        )
        .unwrap();
        assert_eq!(
            file.path(),
            Path::new("/run/credentials/holdfastd.service/nats-password")
        );
        let file =
            SecretFile::resolve(Path::new("/etc/holdfast/pw"), Some(Path::new("/x"))).unwrap();
        assert_eq!(file.path(), Path::new("/etc/holdfast/pw"));
    }

    #[test]
    fn a_line_loses_its_line_ending_and_an_empty_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("password");
        std::fs::write(&path, "s3cret\r\n").unwrap();
        let file = SecretFile::resolve(&path, None).unwrap();
        assert_eq!(file.read_line().unwrap(), "s3cret");
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            file.read_line(),
            Err(SecretFileError::Empty { .. })
        ));
        let missing = SecretFile::resolve(&dir.path().join("missing"), None).unwrap();
        let error = missing.read().unwrap_err().to_string();
        assert!(error.contains("missing"), "{error}");
    }

    #[test]
    fn debug_output_shows_the_path_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "very-secret-token").unwrap();
        let file = SecretFile::resolve(&path, None).unwrap();
        let shown = format!("{file:?}");
        assert!(
            shown.contains("token") && !shown.contains("very-secret"),
            "{shown}"
        );
    }

    #[test]
    fn world_readable_files_get_a_warning() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "x").unwrap();
        let file = SecretFile::resolve(&path, None).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let warning = file.exposure_warning("nats.creds_file").unwrap();
        assert!(warning.contains("nats.creds_file"), "{warning}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(file.exposure_warning("nats.creds_file"), None);
    }
}
