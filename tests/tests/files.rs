//! Attached files end to end: files attached on an in-process `nbserver` appear in the
//! container through the real FUSE mount of the real `nbagent` (under `nbsupervisor`),
//! a real ipykernel reads and writes them as `nbuser`, and what it writes reaches the
//! server, also across a server outage and across a crash of the agent while its
//! upload waits in the outbox; plus copy mode, forced and as the automatic
//! fallback when the FUSE device is missing (`NBAGENT_DEV_FUSE` pointed elsewhere).
//!
//! Needs root, `/dev/fuse`, the `nbuser` account and the kernel venv with pandas
//! (`scripts/setup.sh`); each test says why it skips when they are missing. The mount
//! points are per test, under a temporary directory (`--notebook-files`,
//! `--workspace-files`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use nbagent_protocol::{CellStatus, FileRoot, Message};
use nbagent_tests::kernel::{KERNEL_PYTHON, Notebook, Setup, missing_prerequisite, stdout_of};
use sha2::Digest;

/// One stack at a time (two cores).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SALES: &str = "city,units,price\nBerlin,120,9.5\nPrague,95,8.0\nAmsterdam,143,10.25\n";

fn skip(test: &str, fuse: bool) -> bool {
    let why = missing_prerequisite()
        .or_else(|| {
            (fuse && !Path::new("/dev/fuse").exists())
                .then(|| "/dev/fuse does not exist: FUSE mounts are impossible here".to_owned())
        })
        .or_else(|| {
            let ok = std::process::Command::new(KERNEL_PYTHON)
                .args(["-c", "import pandas"])
                .status()
                .is_ok_and(|s| s.success());
            (!ok).then(|| format!("{KERNEL_PYTHON} cannot import pandas"))
        });
    match why {
        Some(why) => {
            nbagent_tests::say_skip(&format!("SKIP {test}: {why}"));
            true
        }
        None => false,
    }
}

/// A directory for the mount points, reachable by the notebook user.
struct Mounts {
    dir: tempfile::TempDir,
}

impl Mounts {
    fn new() -> Mounts {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod");
        Mounts { dir }
    }

    fn notebook(&self) -> PathBuf {
        self.dir.path().join("notebook_files")
    }

    fn workspace(&self) -> PathBuf {
        self.dir.path().join("workspace_files")
    }

    fn setup(&self, mode: &str, files: Vec<(FileRoot, String, Vec<u8>)>) -> Setup {
        Setup {
            env: vec![("NBAGENT_FILES_MODE".into(), mode.into())],
            agent_args: vec![
                "--notebook-files".into(),
                self.notebook().display().to_string(),
                "--workspace-files".into(),
                self.workspace().display().to_string(),
            ],
            files,
            ..Setup::default()
        }
    }
}

fn attached() -> Vec<(FileRoot, String, Vec<u8>)> {
    vec![
        (FileRoot::Notebook, "sales.csv".into(), SALES.into()),
        (
            FileRoot::Notebook,
            "raw/2024/q1.txt".into(),
            b"first quarter\n".to_vec(),
        ),
        (
            FileRoot::Workspace,
            "shared/readme.md".into(),
            b"# shared\n".to_vec(),
        ),
    ]
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Waits until the server has `path` of the notebook tree with content `want`.
async fn wait_server_file(nb: &Notebook, path: &str, want: &[u8], timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let got = nbserver::files::read(
            &nb.server.state.store,
            &nb.server.state.blobs,
            &nb.agent,
            FileRoot::Notebook,
            path,
        )
        .await
        .expect("read server file");
        if got.as_deref() == Some(want) {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the server has {path} = {:?}, not the {} bytes written\n--- log:\n{}",
                got.map(|g| String::from_utf8_lossy(&g).into_owned()),
                want.len(),
                nb.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The summary the kernel writes from [`SALES`] (`summary.csv`).
const SUMMARY_CSV: &str = "city,units,price,revenue\nBerlin,120,9.5,1140.0\nPrague,95,8.0,760.0\nAmsterdam,143,10.25,1465.75\n";

/// The sha256 the kernel printed for the `summary.csv` it wrote, checked against
/// [`SUMMARY_CSV`].
fn summary_sha(out: &str) -> String {
    let sha = out
        .lines()
        .find_map(|l| l.strip_prefix("sha256 "))
        .expect("sha256 line")
        .to_owned();
    assert_eq!(sha, sha256_hex(SUMMARY_CSV.as_bytes()));
    sha
}

/// Waits until the server has `summary.csv` with the kernel's bytes, recorded with
/// `version` as its version and the right size.
async fn assert_summary_saved(nb: &Notebook, version: &str, timeout: Duration) {
    wait_server_file(nb, "summary.csv", SUMMARY_CSV.as_bytes(), timeout).await;
    let record = nb
        .server
        .state
        .store
        .file(&nb.agent, "notebook", "summary.csv")
        .await
        .unwrap()
        .expect("summary.csv recorded");
    assert_eq!(record.version, version);
    assert_eq!(record.size, SUMMARY_CSV.len() as u64);
}

/// The reference summary the kernel computes from [`SALES`].
const SUMMARY_CODE: &str = r#"
import pandas as pd, hashlib, os
df = pd.read_csv(NB + '/sales.csv')
df['revenue'] = df.units * df.price
print('revenue', df.revenue.sum())
df.to_csv(NB + '/summary.csv', index=False)
with open(NB + '/summary.csv', 'rb') as f:
    print('sha256', hashlib.sha256(f.read()).hexdigest())
st = os.stat(NB + '/summary.csv')
print('owner', st.st_uid == os.getuid())
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounted_files_read_write_and_refuse() {
    if skip("mounted_files_read_write_and_refuse", true) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    let nb = Notebook::start(mounts.setup("mount", attached())).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook().display().to_string();
    let wsdir = mounts.workspace().display().to_string();
    let mount_table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        mount_table.contains(&nbdir) && mount_table.contains(&wsdir),
        "both trees are mounted:\n{mount_table}\n--- log:\n{}",
        nb.log_tail()
    );

    // pandas reads the attached CSV through the mount; what it writes reaches the server.
    let out = nb.stdout(&format!("NB = {nbdir:?}\n{SUMMARY_CODE}")).await;
    assert!(out.contains("revenue 3365.75"), "{out}");
    assert!(
        out.contains("owner True"),
        "files belong to the notebook user: {out}"
    );
    let kernel_sha = summary_sha(&out);
    assert_summary_saved(&nb, &kernel_sha, Duration::from_secs(20)).await;

    // The workspace tree is read-only: EROFS (errno 30), for new and existing files.
    let out = nb
        .stdout(&format!(
            r#"
import errno
for p, mode in [({wsdir:?} + '/new.txt', 'w'), ({wsdir:?} + '/shared/readme.md', 'a')]:
    try:
        open(p, mode).write('x')
        print('wrote', p)
    except OSError as e:
        print('errno', e.errno, errno.errorcode[e.errno])
print(open({wsdir:?} + '/shared/readme.md').read().strip())
"#
        ))
        .await;
    assert_eq!(out.matches("errno 30 EROFS").count(), 2, "{out}");
    assert!(out.contains("# shared"), "{out}");

    // The mount holds exactly the listed files (and what the kernel wrote); a path
    // with `..` resolves outside the mount, it does not reach the server's namespace.
    let out = nb
        .stdout(&format!(
            r#"
import os
for top in [{nbdir:?}, {wsdir:?}]:
    for d, dirs, files in sorted(os.walk(top)):
        for f in sorted(files):
            print('file', os.path.relpath(os.path.join(d, f), os.path.dirname(top)))
print('outside', os.path.realpath({nbdir:?} + '/../../x').startswith({nbdir:?}))
"#
        ))
        .await;
    let mut files: Vec<&str> = out
        .lines()
        .filter_map(|l| l.strip_prefix("file "))
        .collect();
    files.sort_unstable();
    assert_eq!(
        files,
        [
            "notebook_files/raw/2024/q1.txt",
            "notebook_files/sales.csv",
            "notebook_files/summary.csv",
            "workspace_files/shared/readme.md",
        ],
        "{out}"
    );
    assert!(out.contains("outside False"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_during_a_server_outage_lands_after_it() {
    if skip("a_write_during_a_server_outage_lands_after_it", true) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    let mut nb = Notebook::start(mounts.setup("mount", attached())).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook().display().to_string();
    // The cell starts, then the server goes away; the kernel writes 3 MiB while it is
    // down (several chunks) and the close returns at once.
    let request = nb
        .submit(&format!(
            r#"
import time, hashlib, os
print('started', flush=True)
time.sleep(2)
data = bytes((i * 7) % 251 for i in range(3 << 20))
t = time.monotonic()
with open({nbdir:?} + '/during_outage.bin', 'wb') as f:
    f.write(data)
print('closed in', round(time.monotonic() - t, 2))
print('sha256', hashlib.sha256(data).hexdigest())
"#
        ))
        .await;
    nb.wait_for("output", Duration::from_secs(30), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { output, .. } if format!("{output:?}").contains("started")))
            .then_some(())
    })
    .await;
    nb.restart_server(Duration::from_secs(6)).await;
    let r = nb.wait(&request, Duration::from_secs(60)).await;
    assert_eq!(r.status, CellStatus::Ok, "{:?}", r.outputs);
    let out = stdout_of(&r);
    let closed: f64 = out
        .lines()
        .find_map(|l| l.strip_prefix("closed in "))
        .and_then(|s| s.trim().parse().ok())
        .expect("closed line");
    assert!(
        closed < 2.0,
        "the close waited for the server ({closed} s): {out}"
    );
    let data: Vec<u8> = (0..3u64 << 20).map(|i| ((i * 7) % 251) as u8).collect();
    assert!(
        out.contains(&format!("sha256 {}", sha256_hex(&data))),
        "{out}"
    );
    wait_server_file(&nb, "during_outage.bin", &data, Duration::from_secs(30)).await;
    // The agent did lose its session and came back (the upload went through the outbox).
    let log = std::fs::read_to_string(&nb.log).unwrap();
    assert!(
        log.matches("session established").count() >= 2,
        "the agent never reconnected:\n{}",
        nb.log_tail()
    );
}

/// A file closed while the server is down is kept by the outbox (as a link, not a
/// copy); the agent, killed before it could send it, sends it after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_closed_before_an_agent_crash_lands_after_the_restart() {
    if skip(
        "a_file_closed_before_an_agent_crash_lands_after_the_restart",
        true,
    ) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    let mut nb = Notebook::start(mounts.setup("mount", attached())).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook();
    let go = mounts.dir.path().join("go");
    // The cell waits for the test to take the server away, then writes 5 MiB (five
    // chunks) and a second file that says the first one was closed.
    let request = nb
        .submit(&format!(
            r#"
import os, time
print('started', flush=True)
while not os.path.exists({go:?}):
    time.sleep(0.05)
data = bytes((i * 13) % 251 for i in range(5 << 20))
with open({big:?}, 'wb') as f:
    f.write(data)
open({done:?}, 'w').close()
"#,
            go = go.display().to_string(),
            big = nbdir.join("before_crash.bin").display().to_string(),
            done = nbdir.join("closed.txt").display().to_string(),
        ))
        .await;
    nb.wait_for("output", Duration::from_secs(30), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { output, .. } if format!("{output:?}").contains("started")))
            .then_some(())
    })
    .await;
    let config = nb.stop_server().await;
    std::fs::write(&go, b"").unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !nbdir.join("closed.txt").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the kernel never closed its file\n{}",
            nb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The agent dies with the upload only in its outbox; the supervisor restarts it.
    let old = nb.agent_pid().expect("agent running");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if nb.agent_pid().is_some_and(|p| p != old) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no new agent\n{}",
            nb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nb.start_server(config).await;
    let data: Vec<u8> = (0..5u64 << 20).map(|i| ((i * 13) % 251) as u8).collect();
    wait_server_file(&nb, "before_crash.bin", &data, Duration::from_secs(60)).await;
    drop(request);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_mode_copies_in_and_syncs_back_at_shutdown() {
    if skip("copy_mode_copies_in_and_syncs_back_at_shutdown", false) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    let mut nb = Notebook::start(mounts.setup("copy", attached())).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook().display().to_string();
    let mount_table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(!mount_table.contains(&nbdir), "copy mode does not mount");
    let out = nb.stdout(&format!("NB = {nbdir:?}\n{SUMMARY_CODE}")).await;
    assert!(out.contains("revenue 3365.75"), "{out}");
    assert!(out.contains("owner True"), "{out}");
    // The agent said that the files are a copy, and why.
    let notices = nb.messages("output_gap").await;
    assert!(
        notices.iter().any(|s| matches!(&s.msg, Message::OutputGap { reason, .. } if reason.contains("copy") && reason.contains("--files-mode copy"))),
        "{notices:?}"
    );
    // Nothing is uploaded before the shutdown.
    assert!(
        nb.server
            .state
            .store
            .file(&nb.agent, "notebook", "summary.csv")
            .await
            .unwrap()
            .is_none()
    );
    nb.command(&Message::Shutdown {
        reason: "test finished".into(),
        deadline_ms: 10_000,
    })
    .await;
    let status = nb.wait_exit(Duration::from_secs(40)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n--- log:\n{}",
        nb.log_tail()
    );
    wait_server_file(
        &nb,
        "summary.csv",
        SUMMARY_CSV.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    // The original is untouched.
    wait_server_file(&nb, "sales.csv", SALES.as_bytes(), Duration::from_secs(1)).await;
}

/// The notebook tree as the server lists it (`file_list`'s answer): `path` for files,
/// `path/` for directories.
async fn server_tree(nb: &Notebook) -> Vec<String> {
    nbserver::files::listing(&nb.server.state.store, &nb.agent, FileRoot::Notebook)
        .await
        .expect("server listing")
        .into_iter()
        .map(|e| match e.kind {
            nbagent_protocol::FileKind::Dir => format!("{}/", e.path),
            nbagent_protocol::FileKind::File => e.path,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mkdir_rename_unlink_and_rmdir_reach_the_server() {
    if skip("mkdir_rename_unlink_and_rmdir_reach_the_server", true) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    let mut setup = mounts.setup("mount", attached());
    // Re-list every second, so that listings happen while changes are in flight.
    setup
        .agent_args
        .extend(["--files-ttl-secs".into(), "1".into()]);
    let nb = Notebook::start(setup).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook().display().to_string();
    let walk = format!(
        r#"
import os
def walk(top):
    out = []
    for d, dirs, files in os.walk(top):
        for n in dirs:
            out.append(os.path.relpath(os.path.join(d, n), top) + '/')
        for n in files:
            out.append(os.path.relpath(os.path.join(d, n), top))
    return sorted(out)
NB = {nbdir:?}
"#
    );
    let out = nb
        .stdout(&format!(
            r#"{walk}
import time
os.mkdir(NB + '/results')
# A file written inside the new directory while the tree is listed again.
f = open(NB + '/results/draft.csv', 'w')
f.write('a,b\n')
time.sleep(1.5)  # past the listing's ttl
print('listed', sorted(os.listdir(NB)))
f.write('1,2\n')
f.close()
os.rename(NB + '/results/draft.csv', NB + '/results/final.csv')
# Across directories, and a whole directory.
os.rename(NB + '/sales.csv', NB + '/results/sales.csv')
os.rename(NB + '/raw', NB + '/archive')
# Uploaded, renamed, removed: in that order.
with open(NB + '/scratch.txt', 'w') as g:
    g.write('scratch')
os.rename(NB + '/scratch.txt', NB + '/scratch2.txt')
os.unlink(NB + '/scratch2.txt')
os.mkdir(NB + '/gone')
os.rmdir(NB + '/gone')
os.mkdir(NB + '/empty')
print('tree', walk(NB))
"#
        ))
        .await;
    let expected = [
        "archive/",
        "archive/2024/",
        "archive/2024/q1.txt",
        "empty/",
        "results/",
        "results/final.csv",
        "results/sales.csv",
    ];
    let listed_line = out
        .lines()
        .find(|l| l.starts_with("listed "))
        .unwrap_or_default();
    assert!(listed_line.contains("'results'"), "{out}");
    let tree_line = format!(
        "tree [{}]",
        expected
            .iter()
            .map(|p| format!("'{}'", p.trim_end_matches('/')))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // os.walk names directories without the slash; rebuild the kernel's view likewise.
    let kernel_tree = |out: &str| -> Vec<String> {
        out.lines()
            .find_map(|l| l.strip_prefix("tree "))
            .map(|t| {
                t.trim_matches(|c| c == '[' || c == ']')
                    .split(", ")
                    .map(|s| s.trim_matches('\'').to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(kernel_tree(&out), expected, "{out}\n(expected {tree_line})");

    // The server's own listing becomes exactly that, with the right bytes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let tree = server_tree(&nb).await;
        if tree == expected {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the server lists {tree:?}, not {expected:?}\n--- log:\n{}",
            nb.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (path, want) in [
        ("results/final.csv", &b"a,b\n1,2\n"[..]),
        ("results/sales.csv", SALES.as_bytes()),
        ("archive/2024/q1.txt", b"first quarter\n"),
    ] {
        wait_server_file(&nb, path, want, Duration::from_secs(1)).await;
    }

    // After the listing's ttl the mount lists the server's tree again: still the same.
    let out = nb
        .stdout(&format!(
            "{walk}\nimport time\ntime.sleep(2.5)  # past the ttl: a fresh listing\nprint('tree', walk(NB))\nprint(open(NB + '/results/final.csv').read(), end='')\n"
        ))
        .await;
    assert_eq!(kernel_tree(&out), expected, "{out}");
    assert!(out.ends_with("a,b\n1,2\n"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_mode_copies_when_the_fuse_device_is_missing() {
    if skip("auto_mode_copies_when_the_fuse_device_is_missing", false) {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mounts = Mounts::new();
    // The probe looks at a device that does not exist, as in a container started
    // without `--device /dev/fuse`; nothing forces copy mode.
    let missing = mounts.dir.path().join("no-such-fuse");
    let mut setup = mounts.setup("auto", attached());
    setup
        .env
        .push(("NBAGENT_DEV_FUSE".into(), missing.display().to_string()));
    let mut nb = Notebook::start(setup).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    let nbdir = mounts.notebook().display().to_string();
    let mount_table = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mount_table.contains(&nbdir),
        "no mount without the device:\n{mount_table}"
    );
    // The capability report says the same.
    let features = nb.capabilities().await;
    let fuse = features
        .iter()
        .find(|f| f.name == "fuse_mount")
        .expect("fuse_mount feature");
    assert!(
        !fuse.enabled && fuse.detail.contains(&missing.display().to_string()),
        "{fuse:?}"
    );
    // The user is told the files are a copy, that the device does not exist, and what
    // would turn the mount on.
    let notices = nb.messages("output_gap").await;
    let reason = notices
        .iter()
        .find_map(|s| match &s.msg {
            Message::OutputGap { reason, .. } if reason.contains("copy") => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no copy-mode notice: {notices:?}\n{}", nb.log_tail()));
    assert!(
        reason.contains(&format!("{} does not exist", missing.display())),
        "{reason}"
    );
    assert!(
        reason.contains("--device /dev/fuse") && reason.contains("SYS_ADMIN"),
        "{reason}"
    );
    assert!(!reason.contains("--files-mode copy"), "{reason}");

    // pandas reads the attached CSV from the usual path; what the kernel writes is
    // uploaded at shutdown, not before.
    let out = nb.stdout(&format!("NB = {nbdir:?}\n{SUMMARY_CODE}")).await;
    assert!(out.contains("revenue 3365.75"), "{out}");
    assert!(out.contains("owner True"), "{out}");
    let kernel_sha = summary_sha(&out);
    assert!(
        nb.server
            .state
            .store
            .file(&nb.agent, "notebook", "summary.csv")
            .await
            .unwrap()
            .is_none(),
        "uploaded before the shutdown"
    );
    nb.command(&Message::Shutdown {
        reason: "test finished".into(),
        deadline_ms: 10_000,
    })
    .await;
    let status = nb.wait_exit(Duration::from_secs(40)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?}\n--- log:\n{}",
        nb.log_tail()
    );
    assert_summary_saved(&nb, &kernel_sha, Duration::from_secs(5)).await;
}
