//! The user policy against the real user database (the users of scripts/setup.sh).

use nbagent::users::{SudoReason, SystemUserDb, UserError, UserPolicy};

/// Whether the users of scripts/setup.sh exist; prints why not.
fn setup(test: &str) -> bool {
    if !nix::unistd::geteuid().is_root() {
        nbagent_testkit::say_skip(&format!(
            "skipping {test}: needs root (run the tests as root, as CI does)"
        ));
        return false;
    }
    for user in ["nbuser", "nbsudoer"] {
        if nix::unistd::User::from_name(user).ok().flatten().is_none() {
            nbagent_testkit::say_skip(&format!(
                "skipping {test}: user {user} is missing (run scripts/setup.sh)"
            ));
            return false;
        }
    }
    true
}

fn assert_mentions(e: &UserError, parts: &[&str]) {
    let msg = e.to_string();
    for p in parts {
        assert!(msg.contains(p), "{p:?} not in {msg:?}");
    }
}

#[test]
fn notebook_user_is_accepted() {
    if !setup("notebook_user_is_accepted") {
        return;
    }
    let u = UserPolicy::default()
        .authorize(&SystemUserDb, "nbuser", "python3")
        .unwrap();
    let expected = nix::unistd::User::from_name("nbuser")
        .unwrap()
        .expect("nbuser exists");
    assert_eq!(u.uid, expected.uid.as_raw());
    assert_eq!(u.gid, expected.gid.as_raw());
    assert!(u.gids().contains(&u.gid));
    let listed = UserPolicy {
        authorized: vec!["nbuser".into()],
        ..UserPolicy::default()
    };
    assert!(listed.authorize(&SystemUserDb, "nbuser", "python3").is_ok());
}

#[test]
fn root_is_refused() {
    if !setup("root_is_refused") {
        return;
    }
    let e = UserPolicy::default()
        .authorize(&SystemUserDb, "root", "python3")
        .unwrap_err();
    assert!(matches!(e, UserError::Root { .. }));
    assert_mentions(
        &e,
        &[
            "user root",
            "kernel python3",
            "never run as root",
            "KERNEL_USERNAME",
            "--allow-root",
        ],
    );
}

#[test]
fn sudoer_is_refused() {
    if !setup("sudoer_is_refused") {
        return;
    }
    let e = UserPolicy::default()
        .authorize(&SystemUserDb, "nbsudoer", "python3")
        .unwrap_err();
    match &e {
        UserError::Sudoer { reason, .. } => {
            assert_eq!(reason, &SudoReason::Group("sudo".into()));
        }
        other => panic!("{other:?}"),
    }
    assert_mentions(
        &e,
        &[
            "user nbsudoer",
            "kernel python3",
            "has sudo rights (member of group sudo)",
            "--allow-sudoers",
        ],
    );
    let allowed = UserPolicy {
        allow_sudoers: true,
        ..UserPolicy::default()
    };
    assert!(
        allowed
            .authorize(&SystemUserDb, "nbsudoer", "python3")
            .is_ok()
    );
}

#[test]
fn unauthorized_list_wins() {
    if !setup("unauthorized_list_wins") {
        return;
    }
    let policy = UserPolicy {
        authorized: vec!["nbuser".into()],
        unauthorized: vec!["nbuser".into()],
        ..UserPolicy::default()
    };
    let e = policy
        .authorize(&SystemUserDb, "nbuser", "python3")
        .unwrap_err();
    assert!(matches!(e, UserError::Unauthorized { .. }));
    assert_mentions(
        &e,
        &[
            "user nbuser",
            "kernel python3",
            "unauthorized users list (--unauthorized-users)",
            "remove the user from it",
        ],
    );
}

#[test]
fn authorized_list_excludes_others() {
    if !setup("authorized_list_excludes_others") {
        return;
    }
    let policy = UserPolicy {
        authorized: vec!["someone-else".into()],
        ..UserPolicy::default()
    };
    let e = policy
        .authorize(&SystemUserDb, "nbuser", "python3")
        .unwrap_err();
    assert!(matches!(e, UserError::NotAuthorized { .. }));
    assert_mentions(
        &e,
        &[
            "user nbuser",
            "kernel python3",
            "authorized users list (--authorized-users)",
            "add the user to it",
        ],
    );
}

#[test]
fn unknown_user_is_refused() {
    let e = UserPolicy::default()
        .authorize(&SystemUserDb, "no-such-user-nbagent", "python3")
        .unwrap_err();
    assert!(matches!(e, UserError::Unknown { .. }));
    assert_mentions(
        &e,
        &[
            "user no-such-user-nbagent",
            "kernel python3",
            "does not exist",
            "KERNEL_USERNAME",
        ],
    );
}
