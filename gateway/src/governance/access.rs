//! Access decisions: which models a [`Principal`] may call (allow-lists) and which
//! administrative actions its role permits ([`can`]). Pure functions, no I/O.
//!
//! Allow-list patterns: `*` (everything), `prefix*` (so `openai/*` is every model of
//! provider `openai`), or an exact, case-sensitive name. `*` anywhere but at the end is
//! refused when the list is stored ([`validate_pattern`]).
//!
//! Invariants:
//! - A principal's `allow` holds one list per level that restricts (key, user, team,
//!   org); a name is allowed only if **every** list matches it. An empty list matches
//!   nothing, so `Some(vec![])` at any level denies every model.
//! - Virtual models: a list lets through target `label` of virtual model `model` when it
//!   matches `model` **or** `label`. A request is allowed when at least one target passes
//!   every list, and only those targets may be tried ([`filter_targets`]). So
//!   `["openai/*"]` on a team allows virtual model `gpt` only through its OpenAI targets,
//!   and `["gpt"]` on a key allows all of `gpt`'s targets that the other levels allow.
//! - Roles: `admin` may do everything; `auditor` may read everything and write nothing;
//!   `team_admin` may manage the users and keys of its own team (roles up to
//!   `team_admin`; team-less service keys only as `member`) and read its team, but not
//!   change the team itself (its budget is the admin's cap), other teams, orgs, or
//!   admins and auditors; `member` may only read its own key (`GET /admin/me`).
//!   Admins and auditors are global: they are the gateway's operators, across orgs.
//! - Role order is partial: `admin` covers every role, `team_admin` covers `member`,
//!   `auditor` covers `member`; `team_admin` and `auditor` do not cover each other.

use super::model::{Principal, Role};

/// Longest pattern accepted in an allow-list.
pub const MAX_PATTERN_LEN: usize = 256;

/// Whether one pattern matches a model name or target label.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => pattern == name,
    }
}

/// Checks a pattern before it is stored; the error says what is wrong.
pub fn validate_pattern(pattern: &str) -> Result<(), String> {
    if pattern.is_empty() {
        return Err("a model pattern must not be empty".into());
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return Err(format!(
            "a model pattern must be at most {MAX_PATTERN_LEN} bytes"
        ));
    }
    if pattern.chars().any(char::is_whitespace) {
        return Err(format!("model pattern `{pattern}` contains whitespace"));
    }
    if pattern.trim_end_matches('*').contains('*') || pattern.ends_with("**") {
        return Err(format!(
            "model pattern `{pattern}`: `*` is allowed only once, at the end"
        ));
    }
    Ok(())
}

/// Whether any pattern of `list` matches `name`; an empty list matches nothing.
pub fn list_matches(list: &[String], name: &str) -> bool {
    list.iter().any(|p| pattern_matches(p, name))
}

/// Whether `name` (a model as the client named it, or a `provider/model` label) passes
/// every allow-list of the principal.
pub fn model_allowed(principal: &Principal, name: &str) -> bool {
    principal.allow.iter().all(|l| list_matches(l, name))
}

/// Whether target `label` of virtual model `model` may be used: every list must match
/// the virtual name or the label.
pub fn target_allowed(principal: &Principal, model: &str, label: &str) -> bool {
    principal
        .allow
        .iter()
        .all(|l| list_matches(l, model) || list_matches(l, label))
}

/// The targets of `model` the principal may use, in their order. Empty means the model
/// is not allowed (answer as if it did not exist).
pub fn filter_targets<'t, T: AsRef<str>>(
    principal: &Principal,
    model: &str,
    targets: &'t [T],
) -> Vec<&'t T> {
    targets
        .iter()
        .filter(|t| target_allowed(principal, model, t.as_ref()))
        .collect()
}

/// Whether `role` is at most `ceiling` (a key's role under its user's, a role a team
/// admin hands out under its own).
pub fn role_within(role: Role, ceiling: Role) -> bool {
    match ceiling {
        Role::Admin => true,
        Role::TeamAdmin => matches!(role, Role::TeamAdmin | Role::Member),
        Role::Auditor => matches!(role, Role::Auditor | Role::Member),
        Role::Member => role == Role::Member,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Read,
    Create,
    Update,
    Delete,
}

impl Action {
    pub fn is_write(self) -> bool {
        self != Action::Read
    }
}

/// The kinds of directory entities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Org,
    Team,
    User,
    Key,
}

/// What an action is on. Entity variants carry the facts the decision needs; for a
/// create or an update they describe the entity as it would be stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// The caller's own key and principal (`GET /admin/me`).
    Me,
    Audit,
    Usage,
    Config,
    /// A whole kind: "may this role do `action` to any entity of this kind at all?".
    /// A coarse gate before the entity is looked up; the entity is checked after.
    Collection(Kind),
    Org {
        id: &'a str,
    },
    Team {
        id: &'a str,
        org_id: &'a str,
    },
    User {
        org_id: &'a str,
        team_id: Option<&'a str>,
        role: Role,
    },
    Key {
        org_id: &'a str,
        team_id: Option<&'a str>,
        /// The role of the key's user; `None` for a service key (team or org only).
        user_role: Option<Role>,
        role: Role,
    },
}

/// Whether `principal` may do `action` on `resource`. See the module header for the
/// rules.
pub fn can(principal: &Principal, action: Action, resource: &Resource<'_>) -> bool {
    match principal.role {
        Role::Admin => true,
        Role::Auditor => action == Action::Read,
        Role::Member => action == Action::Read && *resource == Resource::Me,
        Role::TeamAdmin => match principal.team_id.as_deref() {
            // A team admin without a team (not creatable; defensive) is a member.
            None => action == Action::Read && *resource == Resource::Me,
            Some(own) => team_admin_can(principal, own, action, resource),
        },
    }
}

fn team_admin_can(principal: &Principal, own: &str, action: Action, r: &Resource<'_>) -> bool {
    let mine =
        |org_id: &str, team_id: Option<&str>| org_id == principal.org_id && team_id == Some(own);
    // Roles a team admin may hand out or act on.
    let manageable = |role: Role| role_within(role, Role::TeamAdmin);
    match *r {
        Resource::Me => action == Action::Read,
        Resource::Audit | Resource::Usage | Resource::Config => false,
        Resource::Collection(Kind::Org) => false,
        Resource::Collection(Kind::Team) => action == Action::Read,
        Resource::Collection(Kind::User | Kind::Key) => true,
        Resource::Org { .. } => false,
        Resource::Team { id, org_id } => {
            action == Action::Read && id == own && org_id == principal.org_id
        }
        Resource::User {
            org_id,
            team_id,
            role,
        } => mine(org_id, team_id) && (action == Action::Read || manageable(role)),
        Resource::Key {
            org_id,
            team_id,
            user_role,
            role,
        } => {
            mine(org_id, team_id)
                && (action == Action::Read
                    || match user_role {
                        Some(ur) => manageable(ur) && manageable(role),
                        None => role == Role::Member,
                    })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::governance::model::{Limits, Scope};

    fn principal(role: Role, team: Option<&str>, allow: Vec<Vec<&str>>) -> Principal {
        Principal {
            key_id: "ak_000000000000".into(),
            org_id: "org_a".into(),
            team_id: team.map(str::to_string),
            user_id: Some("user_1".into()),
            role,
            allow: allow
                .into_iter()
                .map(|l| l.into_iter().map(str::to_string).collect())
                .collect(),
            limits: vec![(Scope::Org("org_a".into()), Limits::default())],
            log_content: false,
        }
    }

    #[test]
    fn patterns() {
        let cases = [
            ("*", "anything/at-all", true),
            ("*", "", true),
            ("openai/*", "openai/gpt-4o", true),
            ("openai/*", "openai/", true),
            ("openai/*", "anthropic/claude", false),
            ("openai/*", "openai", false),
            ("gpt-4*", "gpt-4o-mini", true),
            ("gpt-4*", "gpt-3.5", false),
            ("gpt", "gpt", true),
            ("gpt", "gpt-4", false),
            ("gpt", "GPT", false),
        ];
        for (p, n, want) in cases {
            assert_eq!(pattern_matches(p, n), want, "{p} vs {n}");
        }
        assert!(!list_matches(&[], "gpt"));
    }

    #[test]
    fn pattern_validation() {
        for ok in ["*", "openai/*", "gpt-4*", "gpt"] {
            assert!(validate_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a*b", "*gpt", "a**", "has space", &"x".repeat(300)] {
            assert!(validate_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_level_must_allow() {
        let no_lists = principal(Role::Member, None, vec![]);
        assert!(model_allowed(&no_lists, "anything"));
        let p = principal(
            Role::Member,
            None,
            vec![vec!["gpt*", "claude"], vec!["openai/*", "gpt-4o"]],
        );
        assert!(model_allowed(&p, "gpt-4o"));
        assert!(!model_allowed(&p, "gpt-3.5"), "only the first list matches");
        assert!(!model_allowed(&p, "claude"));
        let empty = principal(Role::Member, None, vec![vec!["*"], vec![]]);
        assert!(
            !model_allowed(&empty, "gpt"),
            "an empty list allows nothing"
        );
        assert!(filter_targets(&empty, "gpt", &["openai/gpt-4o"]).is_empty());
    }

    #[test]
    fn virtual_models_pass_by_name_or_by_target_label() {
        let targets = ["openai/gpt-4o", "anthropic/claude-sonnet"];
        // Team allows a provider, key allows the virtual name.
        let p = principal(Role::Member, None, vec![vec!["gpt"], vec!["openai/*"]]);
        assert!(
            !model_allowed(&p, "gpt"),
            "the name alone fails the team list"
        );
        assert_eq!(filter_targets(&p, "gpt", &targets), vec![&targets[0]]);
        // Name allowed at every level: every target.
        let p = principal(Role::Member, None, vec![vec!["gpt"], vec!["*"]]);
        assert_eq!(filter_targets(&p, "gpt", &targets).len(), 2);
        // No level names it or its targets.
        let p = principal(Role::Member, None, vec![vec!["mistral/*"]]);
        assert!(filter_targets(&p, "gpt", &targets).is_empty());
        // Unrestricted principal.
        let p = principal(Role::Member, None, vec![]);
        assert_eq!(filter_targets(&p, "gpt", &targets).len(), 2);
    }

    #[test]
    fn role_order_is_partial() {
        use Role::*;
        for r in [Admin, Auditor, TeamAdmin, Member] {
            assert!(role_within(r, Admin));
            assert!(role_within(Member, r));
            assert!(role_within(r, r));
        }
        assert!(!role_within(Admin, TeamAdmin));
        assert!(!role_within(Auditor, TeamAdmin));
        assert!(!role_within(TeamAdmin, Auditor));
        assert!(!role_within(TeamAdmin, Member));
    }

    #[test]
    fn role_matrix() {
        use Action::*;
        let admin = principal(Role::Admin, None, vec![]);
        let auditor = principal(Role::Auditor, None, vec![]);
        let ta = principal(Role::TeamAdmin, Some("team_1"), vec![]);
        let member = principal(Role::Member, Some("team_1"), vec![]);
        let teamless_ta = principal(Role::TeamAdmin, None, vec![]);

        let user_in = |team: &'static str, role| Resource::User {
            org_id: "org_a",
            team_id: Some(team),
            role,
        };
        let key_in = |team: &'static str, user_role, role| Resource::Key {
            org_id: "org_a",
            team_id: Some(team),
            user_role,
            role,
        };
        let own_team = Resource::Team {
            id: "team_1",
            org_id: "org_a",
        };
        let other_team = Resource::Team {
            id: "team_2",
            org_id: "org_a",
        };

        for a in [Read, Create, Update, Delete] {
            for r in [
                Resource::Audit,
                Resource::Org { id: "org_a" },
                other_team,
                user_in("team_2", Role::Admin),
            ] {
                assert!(can(&admin, a, &r));
                assert_eq!(can(&auditor, a, &r), a == Read);
                assert!(!can(&member, a, &r));
            }
            assert!(!can(&member, a, &Resource::Collection(Kind::Key)));
            assert_eq!(can(&member, a, &Resource::Me), a == Read);
            assert_eq!(can(&teamless_ta, a, &Resource::Me), a == Read);
            assert!(!can(&teamless_ta, a, &user_in("team_1", Role::Member)));
        }

        // Team admin: its own team's users and keys, up to its own role.
        for a in [Read, Create, Update, Delete] {
            assert!(can(&ta, a, &user_in("team_1", Role::Member)));
            assert!(can(&ta, a, &user_in("team_1", Role::TeamAdmin)));
            assert!(!can(&ta, a, &user_in("team_2", Role::Member)));
            assert!(!can(
                &ta,
                a,
                &key_in("team_2", Some(Role::Member), Role::Member)
            ));
            assert!(can(
                &ta,
                a,
                &key_in("team_1", Some(Role::TeamAdmin), Role::TeamAdmin)
            ));
            assert!(can(&ta, a, &key_in("team_1", None, Role::Member)));
            assert!(!can(&ta, a, &Resource::Org { id: "org_a" }));
            assert!(!can(&ta, a, &Resource::Audit));
            assert!(!can(&ta, a, &other_team));
            assert_eq!(can(&ta, a, &own_team), a == Read);
            assert!(!can(&ta, a, &Resource::Collection(Kind::Org)));
            assert_eq!(can(&ta, a, &Resource::Collection(Kind::Team)), a == Read);
            assert!(can(&ta, a, &Resource::Collection(Kind::User)));
        }
        for a in [Create, Update, Delete] {
            // Never above team_admin, never over admins or auditors.
            assert!(!can(&ta, a, &user_in("team_1", Role::Admin)));
            assert!(!can(&ta, a, &user_in("team_1", Role::Auditor)));
            assert!(!can(
                &ta,
                a,
                &key_in("team_1", Some(Role::Admin), Role::Member)
            ));
            assert!(!can(
                &ta,
                a,
                &key_in("team_1", Some(Role::TeamAdmin), Role::Admin)
            ));
            // Service keys only as member.
            assert!(!can(&ta, a, &key_in("team_1", None, Role::TeamAdmin)));
        }
        // Reading an admin of its own team is fine; another org's team of the same id
        // is not its team.
        assert!(can(&ta, Read, &user_in("team_1", Role::Admin)));
        let foreign = Resource::User {
            org_id: "org_b",
            team_id: Some("team_1"),
            role: Role::Member,
        };
        assert!(!can(&ta, Read, &foreign));
    }
}
