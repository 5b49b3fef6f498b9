//! The embedded store: one sled database in the data directory.
//!
//! Kept behind this small interface so the backend can change. Invariants: one process
//! opens a data directory at a time (sled holds a file lock; a second opener gets
//! [`StoreError::Locked`]); the `meta` tree records the on-disk schema version, written
//! once at creation and checked at every open.

use std::path::{Path, PathBuf};

/// sled page cache size.
const CACHE_BYTES: u64 = 32 * 1024 * 1024;

/// The schema version this build writes and understands.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("data directory {0} is in use by another airlock process")]
    Locked(PathBuf),
    #[error("cannot open the store in {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "the store in {path} has schema version {found}; this build understands {SCHEMA_VERSION}"
    )]
    Schema { path: PathBuf, found: u32 },
    #[error("store I/O failed: {0}")]
    Io(#[from] sled::Error),
}

/// A handle to the open store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    meta: sled::Tree,
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir/db`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("db");
        std::fs::create_dir_all(data_dir).map_err(|e| StoreError::Open {
            path: path.clone(),
            source: sled::Error::Io(e),
        })?;
        // sled's default page cache is 1 GiB; the gateway's hot data is small (the
        // ledger's recent pages and the directory), so keep resident memory modest.
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|e| match e {
                sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StoreError::Locked(data_dir.to_path_buf())
                }
                sled::Error::Io(io) if io.to_string().contains("lock") => {
                    StoreError::Locked(data_dir.to_path_buf())
                }
                other => StoreError::Open {
                    path: path.clone(),
                    source: other,
                },
            })?;
        let meta = db.open_tree("meta")?;
        match meta.get("schema_version")? {
            None => {
                meta.insert("schema_version", &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .unwrap_or(0);
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema { path, found });
                }
            }
        }
        Ok(Store { db, meta })
    }

    /// Whether the store answers reads (for `/ready`).
    pub fn is_ready(&self) -> bool {
        self.meta.get("schema_version").ok().flatten().is_some()
    }

    /// A named tree (keyspace) of the store.
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_records_schema_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        assert!(s.is_ready());
        drop(s);
        let s = Store::open(dir.path()).unwrap();
        assert!(s.is_ready());
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_it() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Locked(_)), "{err}");
    }

    #[test]
    fn a_foreign_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(dir.path()).unwrap();
        s.meta
            .insert("schema_version", &99u32.to_be_bytes())
            .unwrap();
        s.flush().unwrap();
        drop(s);
        assert!(matches!(
            Store::open(dir.path()).unwrap_err(),
            StoreError::Schema { found: 99, .. }
        ));
    }
}
