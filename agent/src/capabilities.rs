//! What this agent can do here, probed at start by trying rather than guessing.
//!
//! [`probe`] returns one [`Feature`] per capability the agent's features depend on:
//!
//! | name | probe |
//! | --- | --- |
//! | `sys_admin` | CAP_SYS_ADMIN in the effective set |
//! | `checkpoint_restore` | CAP_CHECKPOINT_RESTORE in the effective set |
//! | `user_switch` | a forked child switches to the notebook user (`setresgid`, `setresuid`) and sets `PR_SET_NO_NEW_PRIVS` |
//! | `pid_namespace` | a child is cloned into a new PID namespace and exits |
//! | `fuse_mount` | `/dev/fuse` opens read-write, and CAP_SYS_ADMIN (for mount) |
//! | `checkpoint` | CRIU found, `criu --version` >= 4.2, CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN, seccomp off |
//!
//! A disabled feature says in `how_to_enable` what would turn it on. The paths probed
//! (`/proc`, `/dev/fuse`, the CRIU binary) are [`ProbeConfig`] fields.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use caps::{CapSet, Capability};
use nbagent_protocol::Feature;
use nix::sys::wait::{WaitStatus, waitpid};
use tracing::{info, warn};

use crate::kernel::sys::{clone_newpid, fork_probe, raw_no_new_privs, raw_setres_ids};

/// Oldest CRIU that works: CRIU < 4.2 cannot dump processes holding IPv4 sockets on
/// kernels >= 6.16, and ipykernel always holds one.
pub const MIN_CRIU: (u32, u32) = (4, 2);

/// What to probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// Where `/proc` is mounted.
    pub proc_root: PathBuf,
    /// The FUSE device.
    pub dev_fuse: PathBuf,
    /// The CRIU executable (or wrapper script); `None`: `criu` on [`ProbeConfig::path`].
    pub criu: Option<PathBuf>,
    /// The PATH searched for `criu`.
    pub path: String,
    /// How long `criu --version` may take.
    pub criu_timeout: Duration,
    /// uid the user switch probe switches to (the notebook user's).
    pub switch_uid: u32,
    /// gid the user switch probe switches to.
    pub switch_gid: u32,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        Self {
            proc_root: "/proc".into(),
            dev_fuse: "/dev/fuse".into(),
            criu: None,
            path: std::env::var("PATH")
                .unwrap_or_else(|_| crate::kernel::launch::DEFAULT_PATH.into()),
            criu_timeout: Duration::from_secs(5),
            switch_uid: 65534,
            switch_gid: 65534,
        }
    }
}

fn feature(name: &str, enabled: bool, detail: String, how: &str) -> Feature {
    Feature {
        name: name.into(),
        enabled,
        detail,
        how_to_enable: if enabled { String::new() } else { how.into() },
    }
}

fn has_effective(cap: Capability) -> Result<bool, String> {
    caps::has_cap(None, CapSet::Effective, cap).map_err(|e| e.to_string())
}

fn cap_feature(name: &str, cap: Capability, how: &str) -> (Feature, bool) {
    match has_effective(cap) {
        Ok(true) => (
            feature(name, true, format!("{cap} is in the effective set"), how),
            true,
        ),
        Ok(false) => (
            feature(
                name,
                false,
                format!("{cap} is not in the effective set"),
                how,
            ),
            false,
        ),
        Err(e) => (
            feature(
                name,
                false,
                format!("cannot read the capability sets: {e}"),
                how,
            ),
            false,
        ),
    }
}

/// Probes everything; see the module documentation.
pub fn probe(config: &ProbeConfig) -> Vec<Feature> {
    let (sys_admin, has_sys_admin) = cap_feature(
        "sys_admin",
        Capability::CAP_SYS_ADMIN,
        "run the container with --cap-add SYS_ADMIN (or --privileged)",
    );
    let (checkpoint_restore, has_cr) = cap_feature(
        "checkpoint_restore",
        Capability::CAP_CHECKPOINT_RESTORE,
        "run the container with --cap-add CHECKPOINT_RESTORE (Linux >= 5.9), or --cap-add SYS_ADMIN, or --privileged",
    );
    vec![
        probe_user_switch(config),
        probe_pid_namespace(),
        probe_fuse(config, has_sys_admin),
        probe_checkpoint(config, has_sys_admin, has_cr),
        sys_admin,
        checkpoint_restore,
    ]
}

/// Only the `fuse_mount` probe: whether the attached files can be mounted here.
pub fn probe_fuse_mount(config: &ProbeConfig) -> Feature {
    let (_, has_sys_admin) = cap_feature("sys_admin", Capability::CAP_SYS_ADMIN, "");
    probe_fuse(config, has_sys_admin)
}

/// Logs the feature matrix, one structured line per feature.
pub fn log_features(features: &[Feature]) {
    for f in features {
        if f.enabled {
            info!(feature = %f.name, enabled = true, detail = %f.detail, "feature available");
        } else {
            warn!(feature = %f.name, enabled = false, detail = %f.detail, how_to_enable = %f.how_to_enable, "feature unavailable");
        }
    }
}

fn probe_user_switch(config: &ProbeConfig) -> Feature {
    const HOW: &str = "run the agent as root with CAP_SETUID and CAP_SETGID (in the default capability set of docker and podman)";
    let (uid, gid) = (config.switch_uid, config.switch_gid);
    let child = fork_probe(|| {
        if raw_setres_ids(uid, gid).is_err() {
            return 1;
        }
        if raw_no_new_privs().is_err() {
            return 2;
        }
        0
    });
    let status = child.and_then(|pid| {
        loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        }
    });
    match status {
        Ok(WaitStatus::Exited(_, 0)) => feature(
            "user_switch",
            true,
            format!("a probe child switched to uid {uid} gid {gid} and set no_new_privs"),
            HOW,
        ),
        Ok(WaitStatus::Exited(_, 2)) => feature(
            "user_switch",
            false,
            "PR_SET_NO_NEW_PRIVS failed in a probe child (kernels need it)".into(),
            "use a Linux kernel >= 3.5",
        ),
        Ok(st) => feature(
            "user_switch",
            false,
            format!("a probe child could not switch to uid {uid} gid {gid} ({st:?})"),
            HOW,
        ),
        Err(e) => feature(
            "user_switch",
            false,
            format!("cannot fork a probe child: {e}"),
            HOW,
        ),
    }
}

fn probe_pid_namespace() -> Feature {
    const HOW: &str = "run the container with --cap-add SYS_ADMIN (or --privileged); kernels run in their own PID namespace";
    let child = clone_newpid(Box::new(|| 0));
    let status = child.and_then(|pid| {
        loop {
            match waitpid(pid, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other,
            }
        }
    });
    match status {
        Ok(WaitStatus::Exited(_, 0)) => feature(
            "pid_namespace",
            true,
            "a probe child was cloned into a new PID namespace".into(),
            HOW,
        ),
        Ok(st) => feature(
            "pid_namespace",
            false,
            format!("the probe child in a new PID namespace failed ({st:?})"),
            HOW,
        ),
        Err(e) => feature(
            "pid_namespace",
            false,
            format!("clone(CLONE_NEWPID) failed: {e}"),
            HOW,
        ),
    }
}

fn probe_fuse(config: &ProbeConfig, sys_admin: bool) -> Feature {
    const HOW: &str = "run the container with --cap-add SYS_ADMIN --device /dev/fuse (or --privileged); attached files are copied instead of mounted until then";
    let dev = config.dev_fuse.display();
    if !config.dev_fuse.exists() {
        return feature("fuse_mount", false, format!("{dev} does not exist"), HOW);
    }
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&config.dev_fuse)
    {
        return feature("fuse_mount", false, format!("cannot open {dev}: {e}"), HOW);
    }
    if !sys_admin {
        return feature(
            "fuse_mount",
            false,
            format!("{dev} opens, but mounting needs CAP_SYS_ADMIN"),
            HOW,
        );
    }
    feature(
        "fuse_mount",
        true,
        format!("{dev} opens read-write and CAP_SYS_ADMIN is effective"),
        HOW,
    )
}

/// Parses `criu --version` output (`Version: 4.2` or `Version: 4.2.1`, possibly with
/// a `GitID:` line) into (major, minor, patch).
pub fn parse_criu_version(output: &str) -> Option<(u32, u32, u32)> {
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))?;
    let mut parts = line.trim().split(['.', '-', ' ']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    let patch = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    Some((major, minor, patch))
}

/// The CRIU executable: the configured one, else `criu` on the PATH.
pub fn find_criu(config: &ProbeConfig) -> Option<PathBuf> {
    match &config.criu {
        Some(p) => p.is_file().then(|| p.clone()),
        None => crate::kernel::launch::resolve_program("criu", &config.path),
    }
}

/// Runs `criu --version` with a deadline; returns its stdout.
fn criu_version_output(criu: &Path, timeout: Duration) -> Result<String, String> {
    let mut child = Command::new(criu)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run {} --version: {e}", criu.display()))?;
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "{} --version did not finish within {timeout:?}",
                    criu.display()
                ));
            }
            Err(e) => return Err(format!("cannot wait for {} --version: {e}", criu.display())),
        }
    }
    let mut out = String::new();
    if let Some(mut stdout) = child.stdout.take() {
        use std::io::Read;
        let _ = stdout.by_ref().take(64 * 1024).read_to_string(&mut out);
    }
    Ok(out)
}

/// The `Seccomp:` mode of the agent (0: off), from `<proc_root>/self/status`.
fn seccomp_mode(proc_root: &Path) -> Option<u32> {
    let status = std::fs::read_to_string(proc_root.join("self/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .and_then(|v| v.trim().parse().ok())
}

fn probe_checkpoint(config: &ProbeConfig, sys_admin: bool, checkpoint_restore: bool) -> Feature {
    const INSTALL: &str = "install CRIU >= 4.2 (scripts/setup.sh installs it into a private prefix) and give its path to the agent; until then cells are re-executed instead of restored";
    let Some(criu) = find_criu(config) else {
        let where_ = match &config.criu {
            Some(p) => format!("CRIU not found at {}", p.display()),
            None => "no criu on the PATH".into(),
        };
        return feature("checkpoint", false, where_, INSTALL);
    };
    let output = match criu_version_output(&criu, config.criu_timeout) {
        Ok(o) => o,
        Err(e) => return feature("checkpoint", false, e, INSTALL),
    };
    let Some(version) = parse_criu_version(&output) else {
        return feature(
            "checkpoint",
            false,
            format!(
                "cannot read the version in the output of {} --version: {:?}",
                criu.display(),
                output.trim()
            ),
            INSTALL,
        );
    };
    let (major, minor, patch) = version;
    if (major, minor) < MIN_CRIU {
        return feature(
            "checkpoint",
            false,
            format!(
                "CRIU {major}.{minor}.{patch} at {} is too old: CRIU < 4.2 cannot dump processes holding IPv4 sockets on kernels >= 6.16, and ipykernel always holds one",
                criu.display()
            ),
            INSTALL,
        );
    }
    if !sys_admin && !checkpoint_restore {
        return feature(
            "checkpoint",
            false,
            format!(
                "CRIU {major}.{minor}.{patch} found, but neither CAP_CHECKPOINT_RESTORE nor CAP_SYS_ADMIN is effective"
            ),
            "run the container with --cap-add CHECKPOINT_RESTORE (or SYS_ADMIN) and --security-opt seccomp=unconfined, or --privileged",
        );
    }
    match seccomp_mode(&config.proc_root) {
        Some(0) | None => {}
        Some(mode) => {
            return feature(
                "checkpoint",
                false,
                format!(
                    "CRIU {major}.{minor}.{patch} found, but the agent runs under seccomp (mode {mode}), which CRIU cannot work under"
                ),
                "run the container with --security-opt seccomp=unconfined (or --privileged)",
            );
        }
    }
    feature(
        "checkpoint",
        true,
        format!(
            "CRIU {major}.{minor}.{patch} at {}; dump and restore are confirmed on the first checkpoint",
            criu.display()
        ),
        INSTALL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        assert_eq!(parse_criu_version("Version: 4.2\n"), Some((4, 2, 0)));
        assert_eq!(
            parse_criu_version("Version: 4.2.1\nGitID: v4.2.1\n"),
            Some((4, 2, 1))
        );
        assert_eq!(parse_criu_version("Version: 3.17"), Some((3, 17, 0)));
        assert_eq!(parse_criu_version("criu"), None);
    }

    #[test]
    fn missing_criu_and_fuse() {
        let d = tempfile::tempdir().unwrap();
        let config = ProbeConfig {
            dev_fuse: d.path().join("fuse"),
            criu: Some(d.path().join("criu")),
            ..ProbeConfig::default()
        };
        let f = probe_fuse(&config, true);
        assert!(!f.enabled && f.how_to_enable.contains("--device /dev/fuse"));
        let c = probe_checkpoint(&config, true, true);
        assert!(
            !c.enabled && c.how_to_enable.contains("CRIU >= 4.2"),
            "{c:?}"
        );
    }
}
