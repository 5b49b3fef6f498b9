//! First start: the default org, an admin user and its key, written once to
//! `<data_dir>/admin.key` (mode 0600) unless `AIRLOCK_ADMIN_KEY` provides the key.
//!
//! Invariant: runs only while the store has no key at all; the key file is written
//! (temporary file, fsync, rename) before the store, so a crash in between leaves a file
//! that the next start replaces, never a stored key nobody holds.

use std::path::{Path, PathBuf};

use super::{
    loop_fresh_key, now_ms, Directory, DirectoryError, NewKey, NewOrg, NewUser, ADMIN_KEY_FILE,
    DEFAULT_ORG_ID,
};
use crate::governance::keys;
use crate::governance::model::{Limits, Role};

impl Directory {
    /// At first start (no keys at all), creates org `default` ([`DEFAULT_ORG_ID`]), a
    /// user `admin` with role admin, and an admin key for it.
    ///
    /// With `admin_key_env` (the value of `AIRLOCK_ADMIN_KEY`), that key becomes the
    /// admin key; it must be in Airlock's format (`sk-airlock-ak_<12 hex>.<43 base64url>`;
    /// arbitrary strings keep working through `server.master_key_env` instead), else
    /// this fails. Without it, a key is generated and written once to
    /// `<data_dir>/admin.key` (mode 0600, written before the store so a crash can only
    /// leave a file that the next start replaces); its path is returned.
    ///
    /// Once any key exists this does nothing and returns `None`, with or without the
    /// variable (a warning is logged if the variable names a key that is not stored).
    pub fn ensure_bootstrap(
        &self,
        admin_key_env: Option<&str>,
        data_dir: &Path,
    ) -> Result<Option<PathBuf>, DirectoryError> {
        let env = admin_key_env.map(str::trim).filter(|k| !k.is_empty());
        let parsed = match env {
            Some(k) => Some(keys::parse(k).ok_or_else(|| {
                DirectoryError::Bootstrap(
                    "AIRLOCK_ADMIN_KEY is not an Airlock key (sk-airlock-ak_<12 hex>.<43 base64url characters>); unset it to have one generated into admin.key, or use server.master_key_env for an arbitrary key".into(),
                )
            })?),
            None => None,
        };
        let _w = self.writer();
        if !self.read().keys.is_empty() {
            if let Some((id, _)) = parsed {
                if !self.read().keys.contains_key(id) {
                    tracing::warn!(
                        key_id = id,
                        "AIRLOCK_ADMIN_KEY is ignored: the store already has keys and this one is not among them"
                    );
                }
            }
            return Ok(None);
        }
        let (written, id, hash) = match parsed {
            Some((id, secret)) => (None, id.to_string(), keys::hash_secret(secret)),
            None => {
                let (full, id, hash) = loop_fresh_key(&self.read())?;
                let path = data_dir.join(ADMIN_KEY_FILE);
                write_secret_file(&path, full.expose())?;
                (Some(path), id, hash)
            }
        };
        let now = now_ms();
        if !self.read().orgs.contains_key(DEFAULT_ORG_ID) {
            let org = NewOrg {
                name: "default".into(),
                ..NewOrg::default()
            };
            self.insert_org(org, DEFAULT_ORG_ID.to_string(), now, |_| Ok(()))?;
        }
        let user_id = self.read().fresh_id("user_")?;
        let user = NewUser {
            org_id: Some(DEFAULT_ORG_ID.to_string()),
            team_id: None,
            name: "admin".into(),
            role: Role::Admin,
            models: None,
            limits: Limits::default(),
        };
        let user = self.insert_user(user, user_id, now, |_| Ok(()))?;
        let key = NewKey {
            name: "bootstrap admin".into(),
            user_id: Some(user.id),
            role: Some(Role::Admin),
            ..NewKey::default()
        };
        self.insert_key(key, id, hash, now, |_, _| Ok(()))?;
        Ok(written)
    }
}

/// Writes `contents` to `path` readable by the owner only, replacing any old file
/// atomically (write a new file, fsync, rename).
fn write_secret_file(path: &Path, contents: &str) -> Result<(), DirectoryError> {
    use std::io::Write as _;
    let fail = |what: &str, e: std::io::Error| {
        DirectoryError::Bootstrap(format!("cannot {what} {}: {e}", path.display()))
    };
    let tmp = path.with_extension("key.tmp");
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("clear a stale temporary file for", e)),
    }
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp).map_err(|e| fail("create", e))?;
    f.write_all(contents.as_bytes())
        .and_then(|()| f.write_all(b"\n"))
        .and_then(|()| f.sync_all())
        .map_err(|e| fail("write", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| fail("rename into", e))?;
    if let Some(dir) = path.parent() {
        // Make the rename durable; best effort (not every platform can open a dir).
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}
