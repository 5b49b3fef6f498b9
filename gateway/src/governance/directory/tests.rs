//! Directory tests against a real sled store in a temporary directory.

use super::*;
use crate::governance::access::model_allowed;

const NOW: i64 = 1_700_000_000_000;

struct Fx {
    dir: tempfile::TempDir,
    d: Directory,
}

fn open_in(dir: tempfile::TempDir) -> Fx {
    let store = Store::open(dir.path()).unwrap();
    let d = Directory::open(&store).unwrap();
    Fx { dir, d }
}

fn fx() -> Fx {
    open_in(tempfile::tempdir().unwrap())
}

/// Drops the handles and opens the same data directory again.
fn reopen(f: Fx) -> Fx {
    let Fx { dir, d } = f;
    drop(d);
    open_in(dir)
}

fn org(d: &Directory, name: &str, models: Option<Vec<&str>>) -> Org {
    d.create_org(
        NewOrg {
            name: name.into(),
            models: models.map(|m| m.into_iter().map(String::from).collect()),
            limits: Limits {
                rpm_limit: Some(1000),
                ..Limits::default()
            },
        },
        NOW,
        |_| Ok(()),
    )
    .unwrap()
}

fn team(d: &Directory, org_id: &str, models: Option<Vec<&str>>, log_content: bool) -> Team {
    d.create_team(
        NewTeam {
            org_id: org_id.into(),
            name: "team".into(),
            models: models.map(|m| m.into_iter().map(String::from).collect()),
            limits: Limits {
                rpm_limit: Some(100),
                ..Limits::default()
            },
            log_content,
        },
        NOW,
        |_| Ok(()),
    )
    .unwrap()
}

fn user(d: &Directory, team: &Team, role: Role, models: Option<Vec<&str>>) -> User {
    d.create_user(
        NewUser {
            org_id: None,
            team_id: Some(team.id.clone()),
            name: "ann".into(),
            role,
            models: models.map(|m| m.into_iter().map(String::from).collect()),
            limits: Limits::default(),
        },
        NOW,
        |_| Ok(()),
    )
    .unwrap()
}

fn key_for(d: &Directory, user: &User, models: Option<Vec<&str>>) -> CreatedKey {
    d.create_key(
        NewKey {
            name: "laptop".into(),
            user_id: Some(user.id.clone()),
            models: models.map(|m| m.into_iter().map(String::from).collect()),
            ..NewKey::default()
        },
        NOW,
        |_, _| Ok(()),
    )
    .unwrap()
}

/// An org, a team in it, a member of the team and a key of the member.
fn world(d: &Directory) -> (Org, Team, User, CreatedKey) {
    let o = org(d, "acme", Some(vec!["*"]));
    let t = team(d, &o.id, Some(vec!["openai/*", "gpt"]), true);
    let u = user(d, &t, Role::Member, None);
    let k = key_for(d, &u, Some(vec!["gpt*"]));
    (o, t, u, k)
}

fn code(e: DirectoryError) -> String {
    match e {
        DirectoryError::Invalid { param, .. } => format!("invalid:{param}"),
        DirectoryError::Conflict(_) => "conflict".into(),
        DirectoryError::NotFound { kind, .. } => format!("not_found:{kind}"),
        DirectoryError::Forbidden => "forbidden".into(),
        other => format!("other:{other}"),
    }
}

#[test]
fn a_principal_is_built_once_and_follows_every_change_to_the_directory() {
    let f = fx();
    let (_, t, _, k) = world(&f.d);
    let first = f.d.authenticate(k.key.expose(), NOW).unwrap();
    let again = f.d.authenticate(k.key.expose(), NOW).unwrap();
    assert!(
        Arc::ptr_eq(&first, &again),
        "unchanged directory: the same principal"
    );
    assert!(first.log_content);
    // A change to the key's team reaches the key's next authentication.
    f.d.update_team(
        &t.id,
        TeamPatch {
            models: Some(Some(vec!["claude*".into()])),
            log_content: Some(false),
            ..TeamPatch::default()
        },
        |_, _| Ok(()),
    )
    .unwrap();
    let changed = f.d.authenticate(k.key.expose(), NOW).unwrap();
    assert!(!Arc::ptr_eq(&first, &changed));
    assert!(!changed.log_content);
    assert_eq!(changed.allow[1], vec!["claude*".to_string()]);
    // Revocation and expiry are checked on every call, cached principal or not.
    f.d.revoke_key(&k.view.id, NOW, |_, _| Ok(())).unwrap();
    assert_eq!(
        f.d.authenticate(k.key.expose(), NOW),
        Err(AuthError::Revoked)
    );
}

#[test]
fn authenticate_resolves_a_key_to_its_principal_with_every_level() {
    let f = fx();
    let (o, t, u, k) = world(&f.d);
    let p = f.d.authenticate(k.key.expose(), NOW).unwrap();
    assert_eq!(p.key_id, k.view.id);
    assert_eq!(p.org_id, o.id);
    assert_eq!(p.team_id.as_deref(), Some(t.id.as_str()));
    assert_eq!(p.user_id.as_deref(), Some(u.id.as_str()));
    assert_eq!(p.role, Role::Member);
    assert!(p.log_content, "log_content comes from the team");
    // Most specific first; the user has no list (unrestricted), so three lists.
    assert_eq!(
        p.allow,
        vec![
            vec!["gpt*".to_string()],
            vec!["openai/*".to_string(), "gpt".to_string()],
            vec!["*".to_string()],
        ]
    );
    let scopes: Vec<Scope> = p.limits.iter().map(|(s, _)| s.clone()).collect();
    assert_eq!(
        scopes,
        vec![
            Scope::Key(k.view.id.clone()),
            Scope::User(u.id.clone()),
            Scope::Team(t.id.clone()),
            Scope::Org(o.id.clone()),
        ]
    );
    assert_eq!(p.limits[2].1.rpm_limit, Some(100));
    assert_eq!(p.limits[3].1.rpm_limit, Some(1000));
    // The intersection: `gpt` passes all three, `gpt-4o` fails the team list.
    assert!(model_allowed(&p, "gpt"));
    assert!(!model_allowed(&p, "gpt-4o"));
    assert!(!model_allowed(&p, "openai/gpt-4o"), "fails the key list");
}

#[test]
fn authenticate_refuses_each_kind_of_bad_key() {
    let f = fx();
    let (_, _, _, k) = world(&f.d);
    let full = k.key.expose().to_string();
    let (id, secret) = keys::parse(&full).unwrap();
    let d = &f.d;
    assert_eq!(d.authenticate("", NOW), Err(AuthError::Missing));
    assert_eq!(d.authenticate("sk-nope", NOW), Err(AuthError::Malformed));
    assert_eq!(
        d.authenticate(&full[..full.len() - 1], NOW),
        Err(AuthError::Malformed)
    );
    let (other, _, _) = keys::generate();
    assert_eq!(d.authenticate(other.expose(), NOW), Err(AuthError::Unknown));
    let (_, other_secret) = keys::parse(other.expose()).unwrap();
    let wrong = format!(
        "{KEY_PREFIX}{id}.{other_secret}",
        KEY_PREFIX = keys::KEY_PREFIX
    );
    assert_eq!(d.authenticate(&wrong, NOW), Err(AuthError::WrongSecret));
    assert_ne!(secret, other_secret);
    assert!(d.authenticate(&full, NOW).is_ok());

    // Expiry is checked at authentication.
    d.update_key(
        id,
        KeyPatch {
            expires_at: Some(Some(NOW + 1000)),
            ..KeyPatch::default()
        },
        |_, _, _| Ok(()),
    )
    .unwrap();
    assert!(d.authenticate(&full, NOW + 999).is_ok());
    assert_eq!(d.authenticate(&full, NOW + 1000), Err(AuthError::Expired));
    d.update_key(
        id,
        KeyPatch {
            expires_at: Some(None),
            ..KeyPatch::default()
        },
        |_, _, _| Ok(()),
    )
    .unwrap();
    assert!(d.authenticate(&full, NOW + 5000).is_ok(), "expiry removed");

    // Revocation takes effect for the very next call, and sticks.
    let r = d.revoke_key(id, NOW + 10, |_, _| Ok(())).unwrap();
    assert_eq!(r.before.revoked_at, None);
    assert_eq!(r.after.revoked_at, Some(NOW + 10));
    assert_eq!(d.authenticate(&full, NOW), Err(AuthError::Revoked));
    let again = d.revoke_key(id, NOW + 20, |_, _| Ok(())).unwrap();
    assert_eq!(
        again.after.revoked_at,
        Some(NOW + 10),
        "first revocation kept"
    );

    // Every failure is the same 401 to the client.
    for e in [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::Unknown,
        AuthError::WrongSecret,
        AuthError::Revoked,
        AuthError::Expired,
    ] {
        let api: ApiError = e.into();
        assert_eq!(api.status(), axum::http::StatusCode::UNAUTHORIZED);
        assert_eq!(api.public_message(), AUTH_FAILED_MESSAGE);
        assert!(!e.label().is_empty());
    }
}

#[test]
fn key_roles_stay_under_their_users() {
    let f = fx();
    let d = &f.d;
    let (o, t, member, _) = world(d);
    let new = |role| NewKey {
        user_id: Some(member.id.clone()),
        role: Some(role),
        ..NewKey::default()
    };
    for role in [Role::Admin, Role::TeamAdmin, Role::Auditor] {
        let e = d.create_key(new(role), NOW, |_, _| Ok(())).unwrap_err();
        assert_eq!(code(e), "invalid:role");
    }
    // Defaults: the user's role; a service key is member.
    let ta = user(d, &t, Role::TeamAdmin, None);
    let k = key_for(d, &ta, None);
    assert_eq!(k.view.role, Role::TeamAdmin);
    assert_eq!(k.view.team_id.as_deref(), Some(t.id.as_str()));
    let svc = d
        .create_key(
            NewKey {
                team_id: Some(t.id.clone()),
                ..NewKey::default()
            },
            NOW,
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(svc.view.role, Role::Member);
    assert_eq!(svc.view.org_id, o.id);
    // A team_admin key needs a team; the mismatching team of a user is refused.
    let e = d
        .create_key(
            NewKey {
                org_id: Some(o.id.clone()),
                role: Some(Role::TeamAdmin),
                ..NewKey::default()
            },
            NOW,
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:role");
    let t2 = team(d, &o.id, None, false);
    let e = d
        .create_key(
            NewKey {
                user_id: Some(member.id.clone()),
                team_id: Some(t2.id.clone()),
                ..NewKey::default()
            },
            NOW,
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:team_id");
    let e = d
        .create_key(NewKey::default(), NOW, |_, _| Ok(()))
        .unwrap_err();
    assert_eq!(code(e), "invalid:user_id");
    let e = d
        .create_key(
            NewKey {
                user_id: Some(member.id.clone()),
                expires_at: Some(NOW - 1),
                ..NewKey::default()
            },
            NOW,
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:expires_at");
    // Raising a key's role by patch is refused the same way.
    let mk = d
        .list_keys()
        .into_iter()
        .find(|k| k.user_id.as_deref() == Some(member.id.as_str()))
        .unwrap();
    let e = d
        .update_key(
            &mk.id,
            KeyPatch {
                role: Some(Role::Admin),
                ..KeyPatch::default()
            },
            |_, _, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:role");
    // A team service key may become team_admin (the access rules decide who may).
    let u = d
        .update_key(
            &svc.view.id,
            KeyPatch {
                role: Some(Role::TeamAdmin),
                ..KeyPatch::default()
            },
            |_, _, _| Ok(()),
        )
        .unwrap();
    assert_eq!(u.after.role, Role::TeamAdmin);
}

#[test]
fn a_demoted_user_s_keys_act_as_members() {
    let f = fx();
    let d = &f.d;
    let (_, t, _, _) = world(d);
    let ta = user(d, &t, Role::TeamAdmin, None);
    let k = key_for(d, &ta, None);
    assert_eq!(
        d.authenticate(k.key.expose(), NOW).unwrap().role,
        Role::TeamAdmin
    );
    d.update_user(
        &ta.id,
        UserPatch {
            role: Some(Role::Member),
            ..UserPatch::default()
        },
        |_, _| Ok(()),
    )
    .unwrap();
    assert_eq!(
        d.authenticate(k.key.expose(), NOW).unwrap().role,
        Role::Member
    );
}

#[test]
fn deletes_that_would_leave_references_are_refused() {
    let f = fx();
    let d = &f.d;
    let (o, t, u, k) = world(d);
    assert_eq!(
        code(d.delete_org(&o.id, |_| Ok(())).unwrap_err()),
        "conflict"
    );
    assert_eq!(
        code(d.delete_team(&t.id, |_| Ok(())).unwrap_err()),
        "conflict"
    );
    assert_eq!(
        code(d.delete_user(&u.id, |_| Ok(())).unwrap_err()),
        "conflict"
    );
    // A user with keys cannot change team.
    let t2 = team(d, &o.id, None, false);
    let e = d
        .update_user(
            &u.id,
            UserPatch {
                team_id: Some(Some(t2.id.clone())),
                ..UserPatch::default()
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "conflict");
    // Bottom up works, and the `check` sees what is deleted.
    let gone = d.delete_key(&k.view.id, |_, _| Ok(())).unwrap();
    assert_eq!(gone.id, k.view.id);
    assert_eq!(
        d.authenticate(k.key.expose(), NOW),
        Err(AuthError::Unknown),
        "a deleted key authenticates nothing"
    );
    d.delete_user(&u.id, |_| Ok(())).unwrap();
    d.delete_team(&t.id, |_| Ok(())).unwrap();
    d.delete_team(&t2.id, |_| Ok(())).unwrap();
    d.delete_org(&o.id, |_| Ok(())).unwrap();
    assert!(d.list_orgs().is_empty());
    assert_eq!(
        code(d.delete_org(&o.id, |_| Ok(())).unwrap_err()),
        "not_found:org"
    );
}

#[test]
fn a_refusing_check_changes_nothing() {
    let f = fx();
    let d = &f.d;
    let (o, t, u, k) = world(d);
    let no = || DirectoryError::Forbidden;
    assert!(d
        .create_org(
            NewOrg {
                name: "x".into(),
                ..NewOrg::default()
            },
            NOW,
            |_| Err(no())
        )
        .is_err());
    assert_eq!(d.list_orgs().len(), 1);
    assert!(d
        .update_team(
            &t.id,
            TeamPatch {
                name: Some("y".into()),
                ..TeamPatch::default()
            },
            |_, _| Err(no())
        )
        .is_err());
    assert_eq!(d.get_team(&t.id).unwrap().name, "team");
    assert!(d.revoke_key(&k.view.id, NOW, |_, _| Err(no())).is_err());
    assert!(d.authenticate(k.key.expose(), NOW).is_ok());
    assert!(d.delete_user(&u.id, |_| Err(no())).is_err());
    assert!(d.get_user(&u.id).is_some());
    assert!(d.get_org(&o.id).is_some());
}

#[test]
fn patches_distinguish_absent_from_null() {
    let f = fx();
    let d = &f.d;
    let (o, _, _, _) = world(d);
    let patch: OrgPatch = serde_json::from_str(r#"{"name":"renamed"}"#).unwrap();
    let u = d.update_org(&o.id, patch, |_, _| Ok(())).unwrap();
    assert_eq!(u.before.name, "acme");
    assert_eq!(u.after.name, "renamed");
    assert_eq!(
        u.after.models,
        Some(vec!["*".to_string()]),
        "absent: unchanged"
    );
    let patch: OrgPatch = serde_json::from_str(r#"{"models":null}"#).unwrap();
    let u = d.update_org(&o.id, patch, |_, _| Ok(())).unwrap();
    assert_eq!(u.after.models, None, "null: unrestricted");
    let patch: OrgPatch = serde_json::from_str(r#"{"models":[]}"#).unwrap();
    assert_eq!(
        d.update_org(&o.id, patch, |_, _| Ok(()))
            .unwrap()
            .after
            .models,
        Some(vec![])
    );
    let bad: OrgPatch = serde_json::from_str(r#"{"models":["a*b"]}"#).unwrap();
    assert_eq!(
        code(d.update_org(&o.id, bad, |_, _| Ok(())).unwrap_err()),
        "invalid:models"
    );
    assert!(serde_json::from_str::<OrgPatch>(r#"{"nmae":"x"}"#).is_err());
    let blank: OrgPatch = serde_json::from_str(r#"{"name":"  "}"#).unwrap();
    assert_eq!(
        code(d.update_org(&o.id, blank, |_, _| Ok(())).unwrap_err()),
        "invalid:name"
    );
}

#[test]
fn everything_survives_a_reopen() {
    let f = fx();
    let (o, t, u, k) = world(&f.d);
    let full = k.key.expose().to_string();
    let (k2full, k2id) = {
        let k2 = key_for(&f.d, &u, None);
        (k2.key.expose().to_string(), k2.view.id.clone())
    };
    f.d.revoke_key(&k2id, NOW, |_, _| Ok(())).unwrap();
    f.d.touch_last_used(&k.view.id, NOW + 5);
    assert_eq!(f.d.flush_last_used().unwrap(), 1);
    assert_eq!(f.d.flush_last_used().unwrap(), 0, "nothing new to write");
    f.d.touch_last_used(&k.view.id, NOW + 3);
    assert_eq!(
        f.d.flush_last_used().unwrap(),
        0,
        "older uses change nothing"
    );

    let f = reopen(f);
    let d = &f.d;
    assert_eq!(d.get_org(&o.id), Some(o));
    assert_eq!(d.get_team(&t.id), Some(t));
    assert_eq!(d.get_user(&u.id), Some(u));
    assert_eq!(d.get_key(&k.view.id).unwrap().last_used_at, Some(NOW + 5));
    assert!(d.authenticate(&full, NOW).is_ok());
    assert_eq!(d.authenticate(&k2full, NOW), Err(AuthError::Revoked));
}

#[test]
fn last_used_is_cheap_and_never_undoes_a_revoke() {
    let f = fx();
    let (_, _, _, k) = world(&f.d);
    let id = k.view.id.clone();
    f.d.touch_last_used(&id, NOW + 1);
    f.d.touch_last_used("ak_000000000000", NOW + 1);
    assert_eq!(f.d.get_key(&id).unwrap().last_used_at, Some(NOW + 1));
    // A revoke after the touch and before the flush: the flush writes the revoked key.
    f.d.revoke_key(&id, NOW + 2, |_, _| Ok(())).unwrap();
    assert_eq!(f.d.get_key(&id).unwrap().last_used_at, Some(NOW + 1));
    f.d.touch_last_used(&id, NOW + 3);
    f.d.flush_last_used().unwrap();
    let f = reopen(f);
    let v = f.d.get_key(&id).unwrap();
    assert_eq!(v.revoked_at, Some(NOW + 2));
    assert_eq!(v.last_used_at, Some(NOW + 3));
}

#[test]
fn no_hash_or_secret_in_debug_or_views() {
    let f = fx();
    let (_, _, _, k) = world(&f.d);
    let full = k.key.expose().to_string();
    let (_, secret) = keys::parse(&full).unwrap();
    let hash = keys::hash_secret(secret);
    let texts = [
        format!("{:?}", f.d),
        format!("{k:?}"),
        format!("{:?}", f.d.list_keys()),
        serde_json::to_string(&f.d.list_keys()).unwrap(),
        serde_json::to_string(&f.d.get_key(&k.view.id)).unwrap(),
    ];
    for t in &texts {
        assert!(!t.contains(secret), "{t}");
        assert!(!t.contains(&hash), "{t}");
        assert!(!t.contains("secret_hash"), "{t}");
    }
}

#[test]
fn bootstrap_writes_the_admin_key_once_with_mode_0600() {
    let f = fx();
    let path =
        f.d.ensure_bootstrap(None, f.dir.path())
            .unwrap()
            .expect("first start writes the key");
    assert_eq!(path, f.dir.path().join(ADMIN_KEY_FILE));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let text = std::fs::read_to_string(&path).unwrap();
    let p = f.d.authenticate(text.trim(), NOW).unwrap();
    assert_eq!(p.role, Role::Admin);
    assert_eq!(p.org_id, DEFAULT_ORG_ID);
    assert!(p.user_id.is_some());
    assert_eq!(f.d.get_org(DEFAULT_ORG_ID).unwrap().name, "default");
    assert_eq!(
        code(f.d.delete_org(DEFAULT_ORG_ID, |_| Ok(())).unwrap_err()),
        "conflict"
    );

    // Second start (same process and after a reopen): nothing, file untouched.
    assert_eq!(f.d.ensure_bootstrap(None, f.dir.path()).unwrap(), None);
    let f = reopen(f);
    assert_eq!(f.d.ensure_bootstrap(None, f.dir.path()).unwrap(), None);
    let (full, _, _) = keys::generate();
    assert_eq!(
        f.d.ensure_bootstrap(Some(full.expose()), f.dir.path())
            .unwrap(),
        None,
        "the variable is ignored once keys exist"
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    assert_eq!(f.d.list_keys().len(), 1);
    assert_eq!(f.d.list_users().len(), 1);
    assert!(f.d.authenticate(text.trim(), NOW).is_ok());
}

#[test]
fn bootstrap_uses_a_given_key_and_refuses_a_foreign_format() {
    let f = fx();
    let e =
        f.d.ensure_bootstrap(Some("sk-airlock-0123456789abcdef"), f.dir.path())
            .unwrap_err();
    assert!(matches!(e, DirectoryError::Bootstrap(_)), "{e}");
    assert!(
        !e.to_string().contains("0123456789abcdef"),
        "never echo the key"
    );
    assert!(f.d.list_keys().is_empty(), "nothing created");

    let (full, id, _) = keys::generate();
    let text = format!("  {}\n", full.expose());
    assert_eq!(
        f.d.ensure_bootstrap(Some(&text), f.dir.path()).unwrap(),
        None
    );
    assert!(!f.dir.path().join(ADMIN_KEY_FILE).exists());
    let p = f.d.authenticate(full.expose(), NOW).unwrap();
    assert_eq!((p.key_id.as_str(), p.role), (id.as_str(), Role::Admin));
}

#[test]
fn bootstrap_replaces_a_stale_key_file_when_the_store_is_new() {
    let f = fx();
    let path = f.dir.path().join(ADMIN_KEY_FILE);
    std::fs::write(&path, "old").unwrap();
    std::fs::write(path.with_extension("key.tmp"), "half").unwrap();
    f.d.ensure_bootstrap(None, f.dir.path()).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(f.d.authenticate(text.trim(), NOW).is_ok());
    assert!(!path.with_extension("key.tmp").exists());
}

#[test]
fn references_must_exist_and_agree() {
    let f = fx();
    let d = &f.d;
    let e = d
        .create_team(
            NewTeam {
                org_id: "org_nope".into(),
                name: "t".into(),
                ..NewTeam::default()
            },
            NOW,
            |_| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:org_id");
    let o = org(d, "a", None);
    let o2 = org(d, "b", None);
    let t = team(d, &o.id, None, false);
    let mk = |org_id: Option<&str>, team_id: Option<&str>, role| NewUser {
        org_id: org_id.map(String::from),
        team_id: team_id.map(String::from),
        name: "u".into(),
        role,
        models: None,
        limits: Limits::default(),
    };
    let cases = [
        (
            mk(Some(&o2.id), Some(&t.id), Role::Member),
            "invalid:org_id",
        ),
        (mk(None, None, Role::Member), "invalid:org_id"),
        (mk(Some(&o.id), None, Role::TeamAdmin), "invalid:team_id"),
        (mk(None, Some("team_nope"), Role::Member), "invalid:team_id"),
    ];
    for (new, want) in cases {
        assert_eq!(code(d.create_user(new, NOW, |_| Ok(())).unwrap_err()), want);
    }
    let u = d
        .create_user(mk(Some(&o.id), None, Role::Member), NOW, |_| Ok(()))
        .unwrap();
    let t2 = team(d, &o2.id, None, false);
    let e = d
        .update_user(
            &u.id,
            UserPatch {
                team_id: Some(Some(t2.id.clone())),
                ..UserPatch::default()
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
    assert_eq!(code(e), "invalid:team_id", "a team of another org");
    let moved = d
        .update_user(
            &u.id,
            UserPatch {
                team_id: Some(Some(t.id.clone())),
                ..UserPatch::default()
            },
            |_, _| Ok(()),
        )
        .unwrap();
    assert_eq!(moved.after.team_id.as_deref(), Some(t.id.as_str()));
}
