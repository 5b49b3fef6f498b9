//! What admin requests may ask of the directory: the bodies of creates and patches,
//! deserialized strictly (`deny_unknown_fields`), validated by the directory.
//!
//! Patch convention: an absent field is unchanged; `null` clears an optional field
//! (`models: null` = unrestricted, `expires_at: null` = never, `team_id: null` = no
//! team); `limits` replaces the level's limits as a whole.

use serde::{Deserialize, Deserializer};

use crate::governance::model::{Limits, Role};

/// `Some(value)` for a present field, so `null` and absent differ in a patch:
/// absent = unchanged, `null` = cleared.
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

fn default_role() -> Role {
    Role::Member
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrg {
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
}

/// Absent fields are unchanged; `models: null` removes the restriction; `limits`
/// replaces the level's limits as a whole.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub limits: Option<Limits>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewTeam {
    pub org_id: String,
    pub name: String,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub log_content: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeamPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub limits: Option<Limits>,
    #[serde(default)]
    pub log_content: Option<bool>,
}

/// `org_id` may be left out when `team_id` is given (the team's org).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[serde(default)]
    pub org_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    pub name: String,
    #[serde(default = "default_role")]
    pub role: Role,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub role: Option<Role>,
    /// `null` takes the user out of its team.
    #[serde(default, deserialize_with = "present")]
    pub team_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub limits: Option<Limits>,
}

/// A key belongs to a user (`user_id`; org and team are the user's), or is a service
/// key of a team (`team_id`) or an org (`org_id`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewKey {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub user_id: Option<String>,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub org_id: Option<String>,
    /// Defaults to the user's role, or `member` for a service key.
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub models: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyPatch {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default, deserialize_with = "present")]
    pub models: Option<Option<Vec<String>>>,
    #[serde(default)]
    pub limits: Option<Limits>,
    /// `null` removes the expiry; a past time expires the key now.
    #[serde(default, deserialize_with = "present")]
    pub expires_at: Option<Option<i64>>,
}
