//! The directory: orgs, teams, users and API keys, stored in the embedded store and
//! mirrored in memory for the hot path ([`Directory::authenticate`]).
//!
//! On disk: sled trees `orgs`, `teams`, `users`, `keys`; key = entity id (UTF-8), value
//! = the entity as JSON ([`Org`], [`Team`], [`User`], [`ApiKey`]). A key record holds
//! only the SHA-256 of its secret.
//!
//! Invariants:
//! - One `Directory` per store per process ([`Directory::open`] once, then clone the
//!   handle): the in-memory index is the only reader of the trees after open.
//! - Ids are a prefix and 12 random lowercase hex characters: `org_`, `team_`, `user_`,
//!   `ak_` (a key's id is its public id). The bootstrap org is [`DEFAULT_ORG_ID`].
//! - Writes are serialized by one writer lock. Each write goes to its tree, then to the
//!   in-memory index, then the store is flushed before the call returns: an
//!   acknowledged change is durable, and a revocation or expiry change applies to the
//!   very next request. A flush error is returned (the change may or may not survive a
//!   crash; the caller retries).
//! - Every mutating call takes a `check` closure, run under the writer lock on the
//!   entity as it is and as it would be stored, so an access decision cannot race a
//!   concurrent change. It must not call back into the directory.
//! - References are kept whole: deleting an org with teams, users or keys, a team with
//!   users or keys, or a user with keys is refused with [`DirectoryError::Conflict`]
//!   (no cascade: deleting is explicit, one entity at a time). The default org cannot be
//!   deleted. A user with keys cannot change team (its keys are bound to the team).
//! - A user-bound key's org and team are its user's; its role is never above its
//!   user's at creation or update, and if the user is demoted later the key acts as
//!   `member` ([`Directory::authenticate`]). A service key (team or org, no user) is
//!   `member` unless another role is given (the access rules let only admins do that).
//!   `team_admin` users and keys always have a team.
//! - `last_used_at` is kept in memory ([`Directory::touch_last_used`], lock-free under
//!   the read lock) and written by [`Directory::flush_last_used`]; it is the only field
//!   that may lag on disk.
//! - The key hash never leaves this module: keys are returned as [`KeyView`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError, RwLock, RwLockReadGuard};

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::access::{role_within, validate_pattern};
use super::keys::{self, FullKey};
use super::model::{ApiKey, Limits, Org, Principal, Role, Scope, Team, User};
use crate::error::ApiError;
use crate::store::{Store, StoreError};

/// The org created at first start; the master key acts as an admin of it.
pub const DEFAULT_ORG_ID: &str = "org_default";
/// The `key_id` of the master-key principal (never a stored key's id).
pub const MASTER_KEY_ID: &str = "master";
/// The file the generated bootstrap admin key is written to, in the data directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// Longest entity name.
pub const MAX_NAME_LEN: usize = 200;
/// Most patterns in one allow-list.
pub const MAX_PATTERNS: usize = 1000;
/// The one message every authentication failure gets.
pub const AUTH_FAILED_MESSAGE: &str = "Incorrect API key provided.";

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The principal of the configured master key: an admin of the default org.
pub fn master_principal() -> Principal {
    Principal {
        key_id: MASTER_KEY_ID.to_string(),
        org_id: DEFAULT_ORG_ID.to_string(),
        team_id: None,
        user_id: None,
        role: Role::Admin,
        allow: Vec::new(),
        limits: Vec::new(),
        log_content: false,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("{kind} `{id}` does not exist")]
    NotFound { kind: &'static str, id: String },
    /// The change contradicts the stored state (references, duplicates).
    #[error("{0}")]
    Conflict(String),
    /// A field of the request is wrong; `param` names it.
    #[error("{message}")]
    Invalid {
        code: &'static str,
        param: &'static str,
        message: String,
    },
    /// The caller's `check` refused the change.
    #[error("not allowed")]
    Forbidden,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored {tree} record `{id}` is unreadable: {source}")]
    Corrupt {
        tree: &'static str,
        id: String,
        source: serde_json::Error,
    },
    #[error("cannot encode a {0} record: {1}")]
    Encode(&'static str, serde_json::Error),
    #[error("bootstrap failed: {0}")]
    Bootstrap(String),
}

impl From<sled::Error> for DirectoryError {
    fn from(e: sled::Error) -> Self {
        DirectoryError::Store(StoreError::Io(e))
    }
}

fn invalid(param: &'static str, message: impl Into<String>) -> DirectoryError {
    DirectoryError::Invalid {
        code: "invalid_value",
        param,
        message: message.into(),
    }
}

/// Why a presented key was refused. Every variant reaches the client as the same 401
/// ([`AUTH_FAILED_MESSAGE`]); the variant is for logs and metrics ([`AuthError::label`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no key was sent")]
    Missing,
    #[error("the key is not in Airlock's format")]
    Malformed,
    #[error("no key has this public id")]
    Unknown,
    #[error("the secret does not match")]
    WrongSecret,
    #[error("the key is revoked")]
    Revoked,
    #[error("the key has expired")]
    Expired,
}

impl AuthError {
    /// A stable label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
            AuthError::WrongSecret => "wrong_secret",
            AuthError::Revoked => "revoked",
            AuthError::Expired => "expired",
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(_: AuthError) -> Self {
        ApiError::Unauthorized {
            message: AUTH_FAILED_MESSAGE.to_string(),
        }
    }
}

/// A key as shown to anyone: everything but the hash.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyView {
    pub id: String,
    pub name: String,
    pub org_id: String,
    pub team_id: Option<String>,
    pub user_id: Option<String>,
    pub role: Role,
    pub models: Option<Vec<String>>,
    pub limits: Limits,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
}

/// A key just created: the full key (shown once) and its view.
#[derive(Debug)]
pub struct CreatedKey {
    pub key: FullKey,
    pub view: KeyView,
}

/// An entity before and after a change.
#[derive(Debug, Clone, PartialEq)]
pub struct Updated<T> {
    pub before: T,
    pub after: T,
}

/// "Never used" in the atomic last-used slot.
const NEVER: i64 = i64::MIN;

struct KeyEntry {
    key: ApiKey,
    last_used: AtomicI64,
    /// The `last_used` value last written to disk.
    persisted: AtomicI64,
    /// The key's principal as the index stands, built at its first authentication;
    /// every change to the index empties it ([`Directory::apply`]).
    principal: OnceLock<Arc<Principal>>,
}

impl KeyEntry {
    fn new(key: ApiKey) -> Self {
        let lu = key.last_used_at.unwrap_or(NEVER);
        KeyEntry {
            key,
            last_used: AtomicI64::new(lu),
            persisted: AtomicI64::new(lu),
            principal: OnceLock::new(),
        }
    }

    fn last_used(&self) -> Option<i64> {
        Some(self.last_used.load(Ordering::Relaxed)).filter(|&v| v != NEVER)
    }

    /// The key with its current `last_used_at`.
    fn snapshot(&self) -> ApiKey {
        ApiKey {
            last_used_at: self.last_used(),
            ..self.key.clone()
        }
    }

    fn view(&self) -> KeyView {
        let k = &self.key;
        KeyView {
            id: k.id.clone(),
            name: k.name.clone(),
            org_id: k.org_id.clone(),
            team_id: k.team_id.clone(),
            user_id: k.user_id.clone(),
            role: k.role,
            models: k.models.clone(),
            limits: k.limits.clone(),
            expires_at: k.expires_at,
            revoked_at: k.revoked_at,
            created_at: k.created_at,
            last_used_at: self.last_used(),
        }
    }
}

#[derive(Default)]
struct Index {
    orgs: HashMap<String, Org>,
    teams: HashMap<String, Team>,
    users: HashMap<String, User>,
    keys: HashMap<String, KeyEntry>,
}

impl Index {
    fn fresh_id(&self, prefix: &str) -> Result<String, DirectoryError> {
        for _ in 0..16 {
            let id = keys::random_id(prefix);
            let taken = self.orgs.contains_key(&id)
                || self.teams.contains_key(&id)
                || self.users.contains_key(&id)
                || self.keys.contains_key(&id);
            if !taken {
                return Ok(id);
            }
        }
        Err(DirectoryError::Conflict(
            "could not find a free id; try again".into(),
        ))
    }

    fn org(&self, id: &str, param: &'static str) -> Result<&Org, DirectoryError> {
        self.orgs
            .get(id)
            .ok_or_else(|| invalid(param, format!("org `{id}` does not exist")))
    }

    fn team(&self, id: &str, param: &'static str) -> Result<&Team, DirectoryError> {
        self.teams
            .get(id)
            .ok_or_else(|| invalid(param, format!("team `{id}` does not exist")))
    }

    fn user_role(&self, user_id: Option<&str>) -> Option<Role> {
        user_id.and_then(|u| self.users.get(u)).map(|u| u.role)
    }
}

struct Trees {
    orgs: sled::Tree,
    teams: sled::Tree,
    users: sled::Tree,
    keys: sled::Tree,
}

struct Inner {
    store: Store,
    trees: Trees,
    index: RwLock<Index>,
    writer: Mutex<()>,
}

/// Handle to the directory; cheap to clone.
#[derive(Clone)]
pub struct Directory(Arc<Inner>);

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idx = self.read();
        f.debug_struct("Directory")
            .field("orgs", &idx.orgs.len())
            .field("teams", &idx.teams.len())
            .field("users", &idx.users.len())
            .field("keys", &idx.keys.len())
            .finish()
    }
}

fn load<T: DeserializeOwned>(
    tree: &sled::Tree,
    name: &'static str,
    id_of: impl Fn(&T) -> &str,
) -> Result<HashMap<String, T>, DirectoryError> {
    let mut out = HashMap::new();
    for item in tree.iter() {
        let (k, v) = item?;
        let id = String::from_utf8_lossy(&k).into_owned();
        let value: T = serde_json::from_slice(&v).map_err(|source| DirectoryError::Corrupt {
            tree: name,
            id: id.clone(),
            source,
        })?;
        if id_of(&value) != id {
            return Err(DirectoryError::Corrupt {
                tree: name,
                id: id.clone(),
                source: serde::de::Error::custom("the record's id differs from its key"),
            });
        }
        out.insert(id, value);
    }
    Ok(out)
}

fn valid_name(name: &str) -> Result<String, DirectoryError> {
    let t = name.trim();
    if t.is_empty() {
        return Err(invalid("name", "name must not be empty"));
    }
    if t.len() > MAX_NAME_LEN || t.chars().any(char::is_control) {
        return Err(invalid(
            "name",
            format!("name must be at most {MAX_NAME_LEN} bytes without control characters"),
        ));
    }
    Ok(t.to_string())
}

fn valid_models(models: &Option<Vec<String>>) -> Result<(), DirectoryError> {
    let Some(list) = models else { return Ok(()) };
    if list.len() > MAX_PATTERNS {
        return Err(invalid(
            "models",
            format!("at most {MAX_PATTERNS} model patterns"),
        ));
    }
    for p in list {
        validate_pattern(p).map_err(|m| invalid("models", m))?;
    }
    Ok(())
}

fn encode<T: Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, DirectoryError> {
    serde_json::to_vec(v).map_err(|e| DirectoryError::Encode(what, e))
}

fn sorted<T>(items: impl Iterator<Item = T>, key: impl Fn(&T) -> (i64, String)) -> Vec<T> {
    let mut v: Vec<T> = items.collect();
    v.sort_by_cached_key(key);
    v
}

impl Directory {
    /// Opens the directory over `store`, loading every entity into memory.
    pub fn open(store: &Store) -> Result<Directory, DirectoryError> {
        let trees = Trees {
            orgs: store.tree("orgs")?,
            teams: store.tree("teams")?,
            users: store.tree("users")?,
            keys: store.tree("keys")?,
        };
        let index = Index {
            orgs: load(&trees.orgs, "orgs", |o: &Org| &o.id)?,
            teams: load(&trees.teams, "teams", |t: &Team| &t.id)?,
            users: load(&trees.users, "users", |u: &User| &u.id)?,
            keys: load(&trees.keys, "keys", |k: &ApiKey| &k.id)?
                .into_iter()
                .map(|(id, k)| (id, KeyEntry::new(k)))
                .collect(),
        };
        Ok(Directory(Arc::new(Inner {
            store: store.clone(),
            trees,
            index: RwLock::new(index),
            writer: Mutex::new(()),
        })))
    }

    // A poisoned lock means a panic elsewhere (denied by lints outside tests); every
    // critical section leaves the index consistent, so its data is still good.
    fn read(&self) -> RwLockReadGuard<'_, Index> {
        self.0.index.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// The one way the index changes. A change to any org, team, user or key may
    /// change any key's principal, so every cached one is dropped.
    fn apply(&self, f: impl FnOnce(&mut Index)) {
        let mut idx = self.0.index.write().unwrap_or_else(PoisonError::into_inner);
        f(&mut idx);
        for entry in idx.keys.values_mut() {
            entry.principal = OnceLock::new();
        }
    }

    fn writer(&self) -> MutexGuard<'_, ()> {
        self.0.writer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn flush(&self) -> Result<(), DirectoryError> {
        Ok(self.0.store.flush()?)
    }

    // ---- orgs ----

    pub fn list_orgs(&self) -> Vec<Org> {
        sorted(self.read().orgs.values().cloned(), |o| {
            (o.created_at, o.id.clone())
        })
    }

    pub fn get_org(&self, id: &str) -> Option<Org> {
        self.read().orgs.get(id).cloned()
    }

    pub fn create_org(
        &self,
        new: NewOrg,
        now: i64,
        check: impl FnOnce(&Org) -> Result<(), DirectoryError>,
    ) -> Result<Org, DirectoryError> {
        let _w = self.writer();
        let id = self.read().fresh_id("org_")?;
        self.insert_org(new, id, now, check)
    }

    fn insert_org(
        &self,
        new: NewOrg,
        id: String,
        now: i64,
        check: impl FnOnce(&Org) -> Result<(), DirectoryError>,
    ) -> Result<Org, DirectoryError> {
        valid_models(&new.models)?;
        let org = Org {
            id,
            name: valid_name(&new.name)?,
            models: new.models,
            limits: new.limits,
            created_at: now,
        };
        check(&org)?;
        self.0
            .trees
            .orgs
            .insert(org.id.as_bytes(), encode("org", &org)?)?;
        self.apply(|i| {
            i.orgs.insert(org.id.clone(), org.clone());
        });
        self.flush()?;
        Ok(org)
    }

    pub fn update_org(
        &self,
        id: &str,
        patch: OrgPatch,
        check: impl FnOnce(&Org, &Org) -> Result<(), DirectoryError>,
    ) -> Result<Updated<Org>, DirectoryError> {
        let _w = self.writer();
        let before = self.get_org(id).ok_or_else(|| not_found("org", id))?;
        let mut after = before.clone();
        if let Some(n) = patch.name {
            after.name = valid_name(&n)?;
        }
        if let Some(m) = patch.models {
            valid_models(&m)?;
            after.models = m;
        }
        if let Some(l) = patch.limits {
            after.limits = l;
        }
        check(&before, &after)?;
        self.0
            .trees
            .orgs
            .insert(id.as_bytes(), encode("org", &after)?)?;
        self.apply(|i| {
            i.orgs.insert(id.to_string(), after.clone());
        });
        self.flush()?;
        Ok(Updated { before, after })
    }

    pub fn delete_org(
        &self,
        id: &str,
        check: impl FnOnce(&Org) -> Result<(), DirectoryError>,
    ) -> Result<Org, DirectoryError> {
        let _w = self.writer();
        let before = self.get_org(id).ok_or_else(|| not_found("org", id))?;
        check(&before)?;
        if id == DEFAULT_ORG_ID {
            return Err(DirectoryError::Conflict(
                "the default org cannot be deleted".into(),
            ));
        }
        {
            let idx = self.read();
            let teams = idx.teams.values().filter(|t| t.org_id == id).count();
            let users = idx.users.values().filter(|u| u.org_id == id).count();
            let keys = idx.keys.values().filter(|k| k.key.org_id == id).count();
            if teams + users + keys > 0 {
                return Err(DirectoryError::Conflict(format!(
                    "org `{id}` still has {teams} team(s), {users} user(s) and {keys} key(s); delete them first"
                )));
            }
        }
        self.0.trees.orgs.remove(id.as_bytes())?;
        self.apply(|i| {
            i.orgs.remove(id);
        });
        self.flush()?;
        Ok(before)
    }

    // ---- teams ----

    pub fn list_teams(&self) -> Vec<Team> {
        sorted(self.read().teams.values().cloned(), |t| {
            (t.created_at, t.id.clone())
        })
    }

    pub fn get_team(&self, id: &str) -> Option<Team> {
        self.read().teams.get(id).cloned()
    }

    pub fn create_team(
        &self,
        new: NewTeam,
        now: i64,
        check: impl FnOnce(&Team) -> Result<(), DirectoryError>,
    ) -> Result<Team, DirectoryError> {
        let _w = self.writer();
        valid_models(&new.models)?;
        let team = {
            let idx = self.read();
            idx.org(&new.org_id, "org_id")?;
            Team {
                id: idx.fresh_id("team_")?,
                org_id: new.org_id,
                name: valid_name(&new.name)?,
                models: new.models,
                limits: new.limits,
                log_content: new.log_content,
                created_at: now,
            }
        };
        check(&team)?;
        self.0
            .trees
            .teams
            .insert(team.id.as_bytes(), encode("team", &team)?)?;
        self.apply(|i| {
            i.teams.insert(team.id.clone(), team.clone());
        });
        self.flush()?;
        Ok(team)
    }

    pub fn update_team(
        &self,
        id: &str,
        patch: TeamPatch,
        check: impl FnOnce(&Team, &Team) -> Result<(), DirectoryError>,
    ) -> Result<Updated<Team>, DirectoryError> {
        let _w = self.writer();
        let before = self.get_team(id).ok_or_else(|| not_found("team", id))?;
        let mut after = before.clone();
        if let Some(n) = patch.name {
            after.name = valid_name(&n)?;
        }
        if let Some(m) = patch.models {
            valid_models(&m)?;
            after.models = m;
        }
        if let Some(l) = patch.limits {
            after.limits = l;
        }
        if let Some(c) = patch.log_content {
            after.log_content = c;
        }
        check(&before, &after)?;
        self.0
            .trees
            .teams
            .insert(id.as_bytes(), encode("team", &after)?)?;
        self.apply(|i| {
            i.teams.insert(id.to_string(), after.clone());
        });
        self.flush()?;
        Ok(Updated { before, after })
    }

    pub fn delete_team(
        &self,
        id: &str,
        check: impl FnOnce(&Team) -> Result<(), DirectoryError>,
    ) -> Result<Team, DirectoryError> {
        let _w = self.writer();
        let before = self.get_team(id).ok_or_else(|| not_found("team", id))?;
        check(&before)?;
        {
            let idx = self.read();
            let mine = |t: &Option<String>| t.as_deref() == Some(id);
            let users = idx.users.values().filter(|u| mine(&u.team_id)).count();
            let keys = idx.keys.values().filter(|k| mine(&k.key.team_id)).count();
            if users + keys > 0 {
                return Err(DirectoryError::Conflict(format!(
                    "team `{id}` still has {users} user(s) and {keys} key(s); delete them first"
                )));
            }
        }
        self.0.trees.teams.remove(id.as_bytes())?;
        self.apply(|i| {
            i.teams.remove(id);
        });
        self.flush()?;
        Ok(before)
    }

    // ---- users ----

    pub fn list_users(&self) -> Vec<User> {
        sorted(self.read().users.values().cloned(), |u| {
            (u.created_at, u.id.clone())
        })
    }

    pub fn get_user(&self, id: &str) -> Option<User> {
        self.read().users.get(id).cloned()
    }

    pub fn create_user(
        &self,
        new: NewUser,
        now: i64,
        check: impl FnOnce(&User) -> Result<(), DirectoryError>,
    ) -> Result<User, DirectoryError> {
        let _w = self.writer();
        let id = self.read().fresh_id("user_")?;
        self.insert_user(new, id, now, check)
    }

    fn insert_user(
        &self,
        new: NewUser,
        id: String,
        now: i64,
        check: impl FnOnce(&User) -> Result<(), DirectoryError>,
    ) -> Result<User, DirectoryError> {
        valid_models(&new.models)?;
        let org_id = {
            let idx = self.read();
            let org_id = match (&new.team_id, new.org_id) {
                (Some(t), given) => {
                    let team_org = &idx.team(t, "team_id")?.org_id;
                    if given.as_ref().is_some_and(|g| g != team_org) {
                        return Err(invalid(
                            "org_id",
                            format!("team `{t}` belongs to another org"),
                        ));
                    }
                    team_org.clone()
                }
                (None, Some(o)) => o,
                (None, None) => {
                    return Err(DirectoryError::Invalid {
                        code: "missing_required_parameter",
                        param: "org_id",
                        message: "give `org_id` or `team_id`".into(),
                    })
                }
            };
            idx.org(&org_id, "org_id")?;
            org_id
        };
        if new.role == Role::TeamAdmin && new.team_id.is_none() {
            return Err(invalid("team_id", "a team_admin user needs a team"));
        }
        let user = User {
            id,
            org_id,
            team_id: new.team_id,
            name: valid_name(&new.name)?,
            role: new.role,
            models: new.models,
            limits: new.limits,
            created_at: now,
        };
        check(&user)?;
        self.0
            .trees
            .users
            .insert(user.id.as_bytes(), encode("user", &user)?)?;
        self.apply(|i| {
            i.users.insert(user.id.clone(), user.clone());
        });
        self.flush()?;
        Ok(user)
    }

    pub fn update_user(
        &self,
        id: &str,
        patch: UserPatch,
        check: impl FnOnce(&User, &User) -> Result<(), DirectoryError>,
    ) -> Result<Updated<User>, DirectoryError> {
        let _w = self.writer();
        let before = self.get_user(id).ok_or_else(|| not_found("user", id))?;
        let mut after = before.clone();
        if let Some(n) = patch.name {
            after.name = valid_name(&n)?;
        }
        if let Some(r) = patch.role {
            after.role = r;
        }
        if let Some(m) = patch.models {
            valid_models(&m)?;
            after.models = m;
        }
        if let Some(l) = patch.limits {
            after.limits = l;
        }
        if let Some(t) = patch.team_id {
            after.team_id = t;
        }
        {
            let idx = self.read();
            if after.team_id != before.team_id {
                if let Some(t) = &after.team_id {
                    if idx.team(t, "team_id")?.org_id != after.org_id {
                        return Err(invalid(
                            "team_id",
                            format!("team `{t}` belongs to another org"),
                        ));
                    }
                }
                let keys = idx
                    .keys
                    .values()
                    .filter(|k| k.key.user_id.as_deref() == Some(id))
                    .count();
                if keys > 0 {
                    return Err(DirectoryError::Conflict(format!(
                        "user `{id}` has {keys} key(s), which are bound to its team; delete them before moving the user"
                    )));
                }
            }
        }
        if after.role == Role::TeamAdmin && after.team_id.is_none() {
            return Err(invalid("team_id", "a team_admin user needs a team"));
        }
        check(&before, &after)?;
        self.0
            .trees
            .users
            .insert(id.as_bytes(), encode("user", &after)?)?;
        self.apply(|i| {
            i.users.insert(id.to_string(), after.clone());
        });
        self.flush()?;
        Ok(Updated { before, after })
    }

    pub fn delete_user(
        &self,
        id: &str,
        check: impl FnOnce(&User) -> Result<(), DirectoryError>,
    ) -> Result<User, DirectoryError> {
        let _w = self.writer();
        let before = self.get_user(id).ok_or_else(|| not_found("user", id))?;
        check(&before)?;
        let keys = self
            .read()
            .keys
            .values()
            .filter(|k| k.key.user_id.as_deref() == Some(id))
            .count();
        if keys > 0 {
            return Err(DirectoryError::Conflict(format!(
                "user `{id}` still has {keys} key(s); delete them first"
            )));
        }
        self.0.trees.users.remove(id.as_bytes())?;
        self.apply(|i| {
            i.users.remove(id);
        });
        self.flush()?;
        Ok(before)
    }

    // ---- keys ----

    /// Every key, without hashes.
    pub fn list_keys(&self) -> Vec<KeyView> {
        sorted(self.read().keys.values().map(KeyEntry::view), |k| {
            (k.created_at, k.id.clone())
        })
    }

    pub fn get_key(&self, id: &str) -> Option<KeyView> {
        self.read().keys.get(id).map(KeyEntry::view)
    }

    /// The role of a user, if it exists (for access decisions on its keys).
    pub fn user_role(&self, user_id: Option<&str>) -> Option<Role> {
        self.read().user_role(user_id)
    }

    /// Creates a key. `check` sees the key as it will be stored and its user's role.
    pub fn create_key(
        &self,
        new: NewKey,
        now: i64,
        check: impl FnOnce(&KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<CreatedKey, DirectoryError> {
        let _w = self.writer();
        let (full, id, hash) = loop_fresh_key(&self.read())?;
        self.insert_key(new, id, hash, now, check)
            .map(|view| CreatedKey { key: full, view })
    }

    fn insert_key(
        &self,
        new: NewKey,
        id: String,
        secret_hash: String,
        now: i64,
        check: impl FnOnce(&KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<KeyView, DirectoryError> {
        let name = if new.name.trim().is_empty() {
            String::new()
        } else {
            valid_name(&new.name)?
        };
        valid_models(&new.models)?;
        if new.expires_at.is_some_and(|e| e <= now) {
            return Err(invalid("expires_at", "expires_at must be in the future"));
        }
        let (org_id, team_id, user_role, role) = {
            let idx = self.read();
            let mismatch = |param, what: &str| invalid(param, format!("{what} does not match"));
            match (&new.user_id, &new.team_id, &new.org_id) {
                (Some(u), t, o) => {
                    let user = idx
                        .users
                        .get(u)
                        .ok_or_else(|| invalid("user_id", format!("user `{u}` does not exist")))?;
                    if t.is_some() && *t != user.team_id {
                        return Err(mismatch("team_id", "team_id and the user's team"));
                    }
                    if o.as_ref().is_some_and(|o| *o != user.org_id) {
                        return Err(mismatch("org_id", "org_id and the user's org"));
                    }
                    let role = new.role.unwrap_or(user.role);
                    if !role_within(role, user.role) {
                        return Err(invalid(
                            "role",
                            format!(
                                "a key's role cannot be above its user's role ({})",
                                role_name(user.role)
                            ),
                        ));
                    }
                    (
                        user.org_id.clone(),
                        user.team_id.clone(),
                        Some(user.role),
                        role,
                    )
                }
                (None, Some(t), o) => {
                    let team = idx.team(t, "team_id")?;
                    if o.as_ref().is_some_and(|o| *o != team.org_id) {
                        return Err(mismatch("org_id", "org_id and the team's org"));
                    }
                    let role = new.role.unwrap_or(Role::Member);
                    (team.org_id.clone(), Some(t.clone()), None, role)
                }
                (None, None, Some(o)) => {
                    idx.org(o, "org_id")?;
                    (o.clone(), None, None, new.role.unwrap_or(Role::Member))
                }
                (None, None, None) => {
                    return Err(DirectoryError::Invalid {
                        code: "missing_required_parameter",
                        param: "user_id",
                        message: "give `user_id`, or `team_id` or `org_id` for a service key"
                            .into(),
                    })
                }
            }
        };
        if role == Role::TeamAdmin && team_id.is_none() {
            return Err(invalid("role", "a team_admin key needs a team"));
        }
        let key = ApiKey {
            id,
            secret_hash,
            name,
            org_id,
            team_id,
            user_id: new.user_id,
            role,
            models: new.models,
            limits: new.limits,
            expires_at: new.expires_at,
            revoked_at: None,
            created_at: now,
            last_used_at: None,
        };
        let entry = KeyEntry::new(key);
        let view = entry.view();
        check(&view, user_role)?;
        self.0
            .trees
            .keys
            .insert(view.id.as_bytes(), encode("key", &entry.key)?)?;
        self.apply(|i| {
            i.keys.insert(view.id.clone(), entry);
        });
        self.flush()?;
        Ok(view)
    }

    /// Replaces a key's entry with `change` applied, keeping its in-memory last use.
    fn change_key(
        &self,
        id: &str,
        change: impl FnOnce(&mut ApiKey, Option<Role>) -> Result<(), DirectoryError>,
        check: impl FnOnce(&KeyView, &KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<Updated<KeyView>, DirectoryError> {
        let _w = self.writer();
        let (entry, before, user_role) = {
            let idx = self.read();
            let e = idx.keys.get(id).ok_or_else(|| not_found("key", id))?;
            let user_role = idx.user_role(e.key.user_id.as_deref());
            (e.snapshot(), e.view(), user_role)
        };
        let mut key = entry;
        change(&mut key, user_role)?;
        let new_entry = KeyEntry::new(key);
        let after = new_entry.view();
        check(&before, &after, user_role)?;
        self.0
            .trees
            .keys
            .insert(id.as_bytes(), encode("key", &new_entry.key)?)?;
        self.apply(|i| {
            // Keep a last use recorded meanwhile (touch runs under the read lock).
            if let Some(old) = i.keys.get(id) {
                new_entry
                    .last_used
                    .fetch_max(old.last_used.load(Ordering::Relaxed), Ordering::Relaxed);
            }
            i.keys.insert(id.to_string(), new_entry);
        });
        self.flush()?;
        Ok(Updated { before, after })
    }

    pub fn update_key(
        &self,
        id: &str,
        patch: KeyPatch,
        check: impl FnOnce(&KeyView, &KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<Updated<KeyView>, DirectoryError> {
        if let Some(m) = &patch.models {
            valid_models(m)?;
        }
        let name = match &patch.name {
            Some(n) if n.trim().is_empty() => Some(String::new()),
            Some(n) => Some(valid_name(n)?),
            None => None,
        };
        self.change_key(
            id,
            |k, user_role| {
                if let Some(n) = name {
                    k.name = n;
                }
                if let Some(r) = patch.role {
                    if let Some(ur) = user_role.filter(|&ur| !role_within(r, ur)) {
                        return Err(invalid(
                            "role",
                            format!(
                                "a key's role cannot be above its user's role ({})",
                                role_name(ur)
                            ),
                        ));
                    }
                    if r == Role::TeamAdmin && k.team_id.is_none() {
                        return Err(invalid("role", "a team_admin key needs a team"));
                    }
                    k.role = r;
                }
                if let Some(m) = patch.models {
                    k.models = m;
                }
                if let Some(l) = patch.limits {
                    k.limits = l;
                }
                if let Some(e) = patch.expires_at {
                    k.expires_at = e;
                }
                Ok(())
            },
            check,
        )
    }

    /// Revokes a key; from the moment this returns, it authenticates nothing. Revoking
    /// a revoked key keeps its first `revoked_at`.
    pub fn revoke_key(
        &self,
        id: &str,
        now: i64,
        check: impl FnOnce(&KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<Updated<KeyView>, DirectoryError> {
        self.change_key(
            id,
            |k, _| {
                k.revoked_at = k.revoked_at.or(Some(now));
                Ok(())
            },
            |before, _, user_role| check(before, user_role),
        )
    }

    pub fn delete_key(
        &self,
        id: &str,
        check: impl FnOnce(&KeyView, Option<Role>) -> Result<(), DirectoryError>,
    ) -> Result<KeyView, DirectoryError> {
        let _w = self.writer();
        let (before, user_role) = {
            let idx = self.read();
            let e = idx.keys.get(id).ok_or_else(|| not_found("key", id))?;
            (e.view(), idx.user_role(e.key.user_id.as_deref()))
        };
        check(&before, user_role)?;
        self.0.trees.keys.remove(id.as_bytes())?;
        self.apply(|i| {
            i.keys.remove(id);
        });
        self.flush()?;
        Ok(before)
    }

    /// Records a use of a key, in memory only (a relaxed atomic max under the read
    /// lock); [`Directory::flush_last_used`] writes it.
    pub fn touch_last_used(&self, key_id: &str, now: i64) {
        if let Some(e) = self.read().keys.get(key_id) {
            e.last_used.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Writes every last use recorded since the previous call; returns how many keys
    /// were written. Call it every few seconds and at shutdown.
    pub fn flush_last_used(&self) -> Result<usize, DirectoryError> {
        let _w = self.writer();
        let mut written = Vec::new();
        {
            let idx = self.read();
            for (id, e) in &idx.keys {
                let lu = e.last_used.load(Ordering::Relaxed);
                if lu > e.persisted.load(Ordering::Relaxed) {
                    // Under the writer lock the entry is the latest version of the key,
                    // so this cannot undo a concurrent revoke or update.
                    let mut k = e.key.clone();
                    k.last_used_at = Some(lu);
                    self.0
                        .trees
                        .keys
                        .insert(id.as_bytes(), encode("key", &k)?)?;
                    written.push((id.clone(), lu));
                }
            }
        }
        if written.is_empty() {
            return Ok(0);
        }
        self.flush()?;
        let idx = self.read();
        for (id, lu) in &written {
            if let Some(e) = idx.keys.get(id) {
                e.persisted.fetch_max(*lu, Ordering::Relaxed);
            }
        }
        Ok(written.len())
    }

    // ---- authentication ----

    /// Resolves a presented key (the bearer token) to its principal. The secret,
    /// revocation and expiry are checked on every call; the principal itself is built
    /// once per key and version of the index, and shared.
    pub fn authenticate(&self, presented: &str, now_ms: i64) -> Result<Arc<Principal>, AuthError> {
        if presented.is_empty() {
            return Err(AuthError::Missing);
        }
        let (id, secret) = keys::parse(presented).ok_or(AuthError::Malformed)?;
        let idx = self.read();
        let Some(entry) = idx.keys.get(id) else {
            // Same work as a known id, so timing says nothing about which ids exist.
            std::hint::black_box(keys::hash_secret(secret));
            return Err(AuthError::Unknown);
        };
        let key = &entry.key;
        if !keys::verify_secret(secret, &key.secret_hash) {
            return Err(AuthError::WrongSecret);
        }
        if key.revoked_at.is_some() {
            return Err(AuthError::Revoked);
        }
        if key.expires_at.is_some_and(|e| now_ms >= e) {
            return Err(AuthError::Expired);
        }
        if let Some(p) = entry.principal.get() {
            return Ok(p.clone());
        }
        let p = Arc::new(principal_of(&idx, key)?);
        // Another request may have built it meanwhile: the same value, either is kept.
        let _ = entry.principal.set(p.clone());
        Ok(p)
    }
}

/// The principal of `key` as `idx` stands: its role within its user's, the models
/// allowed and the limits at each level. A reference to a deleted user, team or org
/// is refused, not guessed.
fn principal_of(idx: &Index, key: &ApiKey) -> Result<Principal, AuthError> {
    // References are kept whole on delete; a dangling one is refused, not guessed.
    let user = match &key.user_id {
        Some(u) => Some(idx.users.get(u).ok_or(AuthError::Unknown)?),
        None => None,
    };
    let team = match &key.team_id {
        Some(t) => Some(idx.teams.get(t).ok_or(AuthError::Unknown)?),
        None => None,
    };
    let org = idx.orgs.get(&key.org_id).ok_or(AuthError::Unknown)?;
    let role = match user {
        Some(u) if !role_within(key.role, u.role) => Role::Member,
        _ => key.role,
    };
    let mut allow = Vec::new();
    let mut limits = vec![(Scope::Key(key.id.clone()), key.limits.clone())];
    allow.extend(key.models.clone());
    if let Some(u) = user {
        allow.extend(u.models.clone());
        limits.push((Scope::User(u.id.clone()), u.limits.clone()));
    }
    if let Some(t) = team {
        allow.extend(t.models.clone());
        limits.push((Scope::Team(t.id.clone()), t.limits.clone()));
    }
    allow.extend(org.models.clone());
    limits.push((Scope::Org(org.id.clone()), org.limits.clone()));
    Ok(Principal {
        key_id: key.id.clone(),
        org_id: key.org_id.clone(),
        team_id: key.team_id.clone(),
        user_id: key.user_id.clone(),
        role,
        allow,
        limits,
        log_content: team.is_some_and(|t| t.log_content),
    })
}

fn not_found(kind: &'static str, id: &str) -> DirectoryError {
    DirectoryError::NotFound {
        kind,
        id: id.to_string(),
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Admin => "admin",
        Role::Auditor => "auditor",
        Role::TeamAdmin => "team_admin",
        Role::Member => "member",
    }
}

/// A generated key whose public id is not taken.
fn loop_fresh_key(idx: &Index) -> Result<(FullKey, String, String), DirectoryError> {
    for _ in 0..16 {
        let (full, id, hash) = keys::generate();
        if !idx.keys.contains_key(&id) {
            return Ok((full, id, hash));
        }
    }
    Err(DirectoryError::Conflict(
        "could not find a free key id; try again".into(),
    ))
}

mod bootstrap;
mod requests;

pub use requests::{KeyPatch, NewKey, NewOrg, NewTeam, NewUser, OrgPatch, TeamPatch, UserPatch};

#[cfg(test)]
mod tests;
