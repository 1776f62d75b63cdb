//! secrets: where local mode finds the Secret keys a pipeline names, since there is no
//! cluster to hold them. The key `url` of the Secret `amqp` is, in this order:
//! - the file `<secrets-dir>/amqp/url` (the layout of a mounted Secret volume, and what
//!   `kubectl create secret generic amqp --from-file=url=...` takes), or
//! - the environment variable `MAILPIPE_SECRET_AMQP_URL` (the Secret's name, then the key,
//!   upper-cased, with every character other than a letter or a digit as `_`).
//!
//! Values are never logged or printed; a key that is in neither place is refused before
//! anything starts, with both places named.

use std::path::{Path, PathBuf};

use mailpipe_operator::crd::SecretKeyRef;

/// Where one Secret key was found.
#[derive(Clone, PartialEq, Eq)]
pub enum Found {
    /// In this file.
    File(PathBuf),
    /// In the environment (the value).
    Value(String),
}

impl std::fmt::Debug for Found {
    // A value is a secret: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::File(path) => f.debug_tuple("File").field(path).finish(),
            Found::Value(_) => f.write_str("Value(<redacted>)"),
        }
    }
}

/// A Secret key in neither place.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Secret {secret:?} key {key:?}: {where_}")]
pub struct Missing {
    pub secret: String,
    pub key: String,
    where_: String,
}

/// Reads an environment variable.
type Lookup = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// Local mode's Secrets: a directory and the environment.
pub struct LocalSecrets {
    dir: Option<PathBuf>,
    env: Lookup,
}

impl LocalSecrets {
    /// Secrets from `dir` (if given) and this process's environment.
    pub fn new(dir: Option<PathBuf>) -> LocalSecrets {
        LocalSecrets::with_env(dir, |name| std::env::var(name).ok())
    }

    /// Secrets from `dir` and the variables `env` gives.
    pub fn with_env(
        dir: Option<PathBuf>,
        env: impl Fn(&str) -> Option<String> + Send + Sync + 'static,
    ) -> LocalSecrets {
        LocalSecrets {
            dir,
            env: Box::new(env),
        }
    }

    /// The variable that may hold `key`.
    pub fn variable(key: &SecretKeyRef) -> String {
        let upper = |text: &str| -> String {
            text.chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect()
        };
        format!("MAILPIPE_SECRET_{}_{}", upper(&key.name), upper(&key.key))
    }

    /// Where `key` is.
    pub fn find(&self, key: &SecretKeyRef) -> Result<Found, Missing> {
        // A Secret's name and key never hold a path separator (the API server refuses
        // them); refusing them here keeps a pipeline file from naming any file it likes.
        let plain = |text: &str| !text.is_empty() && !text.contains('/') && text != "..";
        if let Some(dir) = &self.dir {
            if plain(&key.name) && plain(&key.key) {
                let path = dir.join(&key.name).join(&key.key);
                if path.is_file() {
                    return Ok(Found::File(path));
                }
            }
        }
        let variable = LocalSecrets::variable(key);
        if let Some(value) = (self.env)(&variable) {
            return Ok(Found::Value(value));
        }
        let where_ = match &self.dir {
            Some(dir) => format!(
                "neither the file {} nor the variable {variable} exists",
                Path::new(dir).join(&key.name).join(&key.key).display()
            ),
            None => format!(
                "the variable {variable} is not set (or give --secrets-dir DIR with the file DIR/{}/{})",
                key.name, key.key
            ),
        };
        Err(Missing {
            secret: key.name.clone(),
            key: key.key.clone(),
            where_,
        })
    }

    /// The value of `key` (a file's content without its final line break, as the worker
    /// reads it).
    pub fn read(&self, key: &SecretKeyRef) -> anyhow::Result<String> {
        match self.find(key)? {
            Found::Value(value) => Ok(value),
            Found::File(path) => {
                let text = std::fs::read_to_string(&path)
                    .map_err(|error| anyhow::anyhow!("cannot read {}: {error}", path.display()))?;
                Ok(text.trim_end_matches(['\r', '\n']).to_string())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str, key: &str) -> SecretKeyRef {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }

    #[test]
    fn files_come_first_then_the_environment() {
        let dir = tempfile::tempdir().expect("a directory");
        std::fs::create_dir(dir.path().join("amqp")).unwrap();
        std::fs::write(dir.path().join("amqp/url"), "amqp://from-file\n").unwrap();
        let secrets = LocalSecrets::with_env(Some(dir.path().into()), |name| {
            (name == "MAILPIPE_SECRET_SMTP_AUTH_PASSWORD" || name == "MAILPIPE_SECRET_AMQP_URL")
                .then(|| "from-env".to_string())
        });
        assert_eq!(
            secrets.find(&key("amqp", "url")).unwrap(),
            Found::File(dir.path().join("amqp/url"))
        );
        assert_eq!(
            secrets.read(&key("amqp", "url")).unwrap(),
            "amqp://from-file"
        );
        assert_eq!(
            secrets.read(&key("smtp-auth", "password")).unwrap(),
            "from-env"
        );
    }

    #[test]
    fn a_missing_key_names_both_places_and_no_value_is_printed() {
        let dir = tempfile::tempdir().expect("a directory");
        let secrets = LocalSecrets::with_env(Some(dir.path().into()), |_| None);
        let error = secrets.find(&key("redis", "url")).unwrap_err().to_string();
        assert!(error.contains("redis/url"), "{error}");
        assert!(error.contains("MAILPIPE_SECRET_REDIS_URL"), "{error}");
        let shown = format!("{:?}", Found::Value("amqp://user:secret@h".into()));
        assert!(!shown.contains("secret@"), "{shown}");
    }

    #[test]
    fn names_cannot_reach_outside_the_directory() {
        let dir = tempfile::tempdir().expect("a directory");
        std::fs::write(dir.path().join("top"), "x").unwrap();
        let inner = dir.path().join("secrets");
        std::fs::create_dir(&inner).unwrap();
        let secrets = LocalSecrets::with_env(Some(inner), |_| None);
        assert!(secrets.find(&key("..", "top")).is_err());
    }
}
