//! Who may run kernels.
//!
//! [`UserPolicy::authorize`] decides, in this order: the unauthorized users list (a user
//! on it is refused even if also authorized), the user database (unknown users are
//! refused), root (refused unless `allow_root`), the authorized users list (when not
//! empty, only users on it), and sudo rights (refused unless `allow_sudoers`). A user has
//! sudo rights if its uid is 0, it is a member of one of [`UserPolicy::sudo_groups`]
//! (`sudo`, `wheel`, `admin`), or a sudoers file names it or one of its groups (a
//! best-effort scan of [`UserPolicy::sudoers_paths`]). Privileged users are never
//! impersonated by default: a kernel of a user who can become root is a root kernel.
//!
//! User lookups go through [`UserDb`], so the policy is unit-tested with a fake database;
//! [`SystemUserDb`] is the real one (`getpwnam`, `getgrouplist`).

use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Group, User};

/// A user as the kernel launch needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserInfo {
    /// Login name.
    pub name: String,
    /// uid.
    pub uid: u32,
    /// Primary gid.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
    /// Login shell.
    pub shell: PathBuf,
    /// Every group of the user (the primary one included) as `(gid, name)`.
    pub groups: Vec<(u32, String)>,
}

impl UserInfo {
    /// The gids of [`UserInfo::groups`], for `setgroups`.
    pub fn gids(&self) -> Vec<u32> {
        self.groups.iter().map(|(g, _)| *g).collect()
    }
}

/// A user database.
pub trait UserDb {
    /// The user named `name`, with its groups, or `None` if there is none.
    fn lookup(&self, name: &str) -> std::io::Result<Option<UserInfo>>;
}

/// The system's user database (NSS: `getpwnam`, `getgrouplist`, `getgrgid`).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemUserDb;

impl UserDb for SystemUserDb {
    fn lookup(&self, name: &str) -> std::io::Result<Option<UserInfo>> {
        let Some(user) = User::from_name(name)? else {
            return Ok(None);
        };
        let cname = std::ffi::CString::new(name)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let gids = nix::unistd::getgrouplist(&cname, user.gid)?;
        let mut groups = Vec::with_capacity(gids.len());
        for gid in gids {
            let gname = Group::from_gid(gid)?.map(|g| g.name).unwrap_or_default();
            groups.push((gid.as_raw(), gname));
        }
        if !groups.iter().any(|(g, _)| *g == user.gid.as_raw()) {
            let gname = Group::from_gid(Gid::from_raw(user.gid.as_raw()))?
                .map(|g| g.name)
                .unwrap_or_default();
            groups.insert(0, (user.gid.as_raw(), gname));
        }
        Ok(Some(UserInfo {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
            shell: user.shell,
            groups,
        }))
    }
}

/// Why a user has sudo rights.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SudoReason {
    /// Member of a sudo-granting group.
    Group(String),
    /// Named in a sudoers file.
    SudoersFile(PathBuf),
}

impl std::fmt::Display for SudoReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SudoReason::Group(g) => write!(f, "member of group {g}"),
            SudoReason::SudoersFile(p) => write!(f, "named in {}", p.display()),
        }
    }
}

/// Why a user may not run a kernel.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UserError {
    /// On the unauthorized users list.
    #[error(
        "user {user} is on the unauthorized users list (--unauthorized-users); remove the user from it to let them run kernel {kernel}"
    )]
    Unauthorized {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
    },
    /// Not on a non-empty authorized users list.
    #[error(
        "user {user} is not on the authorized users list (--authorized-users); add the user to it to let them run kernel {kernel}"
    )]
    NotAuthorized {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
    },
    /// The user is root.
    #[error(
        "user {user} is root (uid 0): kernels never run as root by default; set KERNEL_USERNAME to an unprivileged user to run kernel {kernel} (or pass --allow-root)"
    )]
    Root {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
    },
    /// The user can become root.
    #[error(
        "user {user} has sudo rights ({reason}): kernels do not run as users who can become root by default; set KERNEL_USERNAME to an unprivileged user to run kernel {kernel} (or pass --allow-sudoers)"
    )]
    Sudoer {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
        /// Why the user has sudo rights.
        reason: SudoReason,
    },
    /// No such user.
    #[error(
        "user {user} does not exist on this machine; create the user or set KERNEL_USERNAME to an existing one to run kernel {kernel}"
    )]
    Unknown {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
    },
    /// The user database could not be read.
    #[error("cannot look up user {user} (for kernel {kernel})")]
    Lookup {
        /// The user.
        user: String,
        /// The kernel.
        kernel: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Who may run kernels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserPolicy {
    /// When not empty, only these users.
    pub authorized: Vec<String>,
    /// Never these users (checked first).
    pub unauthorized: Vec<String>,
    /// Let root run kernels.
    pub allow_root: bool,
    /// Let users with sudo rights run kernels.
    pub allow_sudoers: bool,
    /// Groups that grant sudo rights.
    pub sudo_groups: Vec<String>,
    /// Sudoers files, or directories of them, scanned for the user's name.
    pub sudoers_paths: Vec<PathBuf>,
}

impl Default for UserPolicy {
    fn default() -> Self {
        Self {
            authorized: Vec::new(),
            unauthorized: Vec::new(),
            allow_root: false,
            allow_sudoers: false,
            sudo_groups: vec!["sudo".into(), "wheel".into(), "admin".into()],
            sudoers_paths: vec!["/etc/sudoers".into(), "/etc/sudoers.d".into()],
        }
    }
}

impl UserPolicy {
    /// Decides whether `user` may run `kernel`; returns the user on success.
    pub fn authorize(
        &self,
        db: &dyn UserDb,
        user: &str,
        kernel: &str,
    ) -> Result<UserInfo, UserError> {
        let (u, k) = (user.to_owned(), kernel.to_owned());
        if self.unauthorized.iter().any(|n| n == user) {
            return Err(UserError::Unauthorized { user: u, kernel: k });
        }
        let info = match db.lookup(user) {
            Ok(Some(info)) => info,
            Ok(None) => return Err(UserError::Unknown { user: u, kernel: k }),
            Err(source) => {
                return Err(UserError::Lookup {
                    user: u,
                    kernel: k,
                    source,
                });
            }
        };
        if info.uid == 0 && !self.allow_root {
            return Err(UserError::Root { user: u, kernel: k });
        }
        if !self.authorized.is_empty() && !self.authorized.iter().any(|n| n == user) {
            return Err(UserError::NotAuthorized { user: u, kernel: k });
        }
        if info.uid != 0
            && !self.allow_sudoers
            && let Some(reason) = self.sudo_reason(&info)
        {
            return Err(UserError::Sudoer {
                user: u,
                kernel: k,
                reason,
            });
        }
        Ok(info)
    }

    /// Why `user` has sudo rights, if it has (uid 0 aside).
    pub fn sudo_reason(&self, user: &UserInfo) -> Option<SudoReason> {
        if let Some((_, g)) = user
            .groups
            .iter()
            .find(|(_, g)| self.sudo_groups.iter().any(|s| s == g))
        {
            return Some(SudoReason::Group(g.clone()));
        }
        for path in &self.sudoers_paths {
            for file in sudoers_files(path) {
                if let Ok(text) = std::fs::read_to_string(&file)
                    && sudoers_names(&text, user)
                {
                    return Some(SudoReason::SudoersFile(file));
                }
            }
        }
        None
    }
}

/// `path` itself if it is a file; the files of `path` if it is a directory, skipping
/// the names sudo skips (containing `.` or ending in `~`).
fn sudoers_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            (!name.contains('.') && !name.ends_with('~')).then(|| e.path())
        })
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

/// Whether a sudoers text has a rule for `user` or one of its groups (`%group`): the
/// first word of a non-comment line. Best effort: aliases are not expanded.
pub fn sudoers_names(text: &str, user: &UserInfo) -> bool {
    text.lines().any(|line| {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("Defaults") {
            return false;
        }
        let Some(first) = line.split_whitespace().next() else {
            return false;
        };
        first.split(',').any(|who| match who.strip_prefix('%') {
            Some(group) => user.groups.iter().any(|(_, g)| g == group),
            None => who == user.name,
        })
    })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct FakeDb(HashMap<String, UserInfo>);

    impl UserDb for FakeDb {
        fn lookup(&self, name: &str) -> std::io::Result<Option<UserInfo>> {
            Ok(self.0.get(name).cloned())
        }
    }

    fn user(name: &str, uid: u32, groups: &[&str]) -> UserInfo {
        UserInfo {
            name: name.into(),
            uid,
            gid: uid,
            home: format!("/home/{name}").into(),
            shell: "/bin/sh".into(),
            groups: std::iter::once((uid, name.to_string()))
                .chain(
                    groups
                        .iter()
                        .enumerate()
                        .map(|(i, g)| (5000 + i as u32, g.to_string())),
                )
                .collect(),
        }
    }

    fn db() -> FakeDb {
        FakeDb(
            [
                user("root", 0, &[]),
                user("alice", 1000, &[]),
                user("bob", 1001, &["wheel"]),
                user("carol", 1002, &["ops"]),
            ]
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect(),
        )
    }

    fn policy() -> UserPolicy {
        UserPolicy {
            sudoers_paths: vec![],
            ..UserPolicy::default()
        }
    }

    #[test]
    fn default_policy() {
        let p = policy();
        assert_eq!(p.authorize(&db(), "alice", "python3").unwrap().uid, 1000);
        assert!(matches!(
            p.authorize(&db(), "root", "python3"),
            Err(UserError::Root { .. })
        ));
        let e = p.authorize(&db(), "bob", "python3").unwrap_err();
        assert!(e.to_string().contains("member of group wheel"), "{e}");
        assert!(matches!(
            p.authorize(&db(), "nobody-here", "python3"),
            Err(UserError::Unknown { .. })
        ));
    }

    #[test]
    fn lists_and_allowances() {
        let p = UserPolicy {
            authorized: vec!["alice".into(), "root".into(), "bob".into()],
            unauthorized: vec!["alice".into()],
            ..policy()
        };
        assert!(matches!(
            p.authorize(&db(), "alice", "k"),
            Err(UserError::Unauthorized { .. })
        ));
        assert!(matches!(
            p.authorize(&db(), "carol", "k"),
            Err(UserError::NotAuthorized { .. })
        ));
        // Unknown but unauthorized: the list is checked before the lookup.
        let p2 = UserPolicy {
            unauthorized: vec!["ghost".into()],
            ..policy()
        };
        assert!(matches!(
            p2.authorize(&db(), "ghost", "k"),
            Err(UserError::Unauthorized { .. })
        ));
        let open = UserPolicy {
            allow_root: true,
            allow_sudoers: true,
            ..p
        };
        assert!(open.authorize(&db(), "root", "k").is_ok());
        assert!(open.authorize(&db(), "bob", "k").is_ok());
    }

    #[test]
    fn sudoers_scan() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ops"),
            "# comment carol\n%ops ALL=(ALL) ALL\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("skipped.bak"), "alice ALL=(ALL) ALL\n").unwrap();
        let p = UserPolicy {
            sudoers_paths: vec![dir.path().into()],
            ..policy()
        };
        let e = p.authorize(&db(), "carol", "k").unwrap_err();
        assert!(matches!(
            e,
            UserError::Sudoer {
                reason: SudoReason::SudoersFile(_),
                ..
            }
        ));
        assert!(p.authorize(&db(), "alice", "k").is_ok());
        assert!(sudoers_names(
            "alice,bob ALL=(ALL) ALL",
            &user("bob", 1, &[])
        ));
        assert!(!sudoers_names(
            "Defaults env_reset\n",
            &user("Defaults", 1, &[])
        ));
    }
}
