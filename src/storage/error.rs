//! The storage layer's error: its own failures, and the client's when the cache is the one
//! that failed (wrapped, so the client's error type does not grow storage cases).

use std::io;
use std::sync::Arc;

use crate::client::KeyError;

/// A `Result` with the storage [`StorageError`].
pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Everything a [`Storage`](super::Storage) call can fail with. Cheap to clone.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// The collection or resource (or the part asked for) does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// A collection or resource name that could be read as a path (`/`, `\`, NUL, `.`,
    /// `..`, empty) or is too long once encoded.
    #[error("invalid name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// A file-system or other back-end failure.
    #[error("storage error ({context}): {source}")]
    Io {
        /// What was being done, and on what.
        context: String,
        /// The underlying error.
        #[source]
        source: Arc<io::Error>,
    },
    /// A configuration the storage cannot keep its promises with, refused (for example a
    /// [`MemcacheStorage`](super::MemcacheStorage) over clients with a namespace).
    #[error("configuration refused: {0}")]
    Config(String),
    /// The memcached client failed (and the call could not fall back to the master).
    #[error(transparent)]
    Cache(#[from] crate::Error),
}

impl From<KeyError> for StorageError {
    fn from(e: KeyError) -> Self {
        StorageError::Cache(e.into())
    }
}

impl StorageError {
    /// A back-end failure while doing `context`.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> StorageError {
        StorageError::Io {
            context: context.into(),
            source: Arc::new(source),
        }
    }
}
