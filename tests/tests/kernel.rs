//! Real Jupyter kernels under the PID-1 supervisor, end to end: an in-process `nbserver`,
//! the real `nbsupervisor` running the real `nbagent`, which runs ipykernel from
//! /opt/nbagent/venv as `nbuser` in its own PID namespace.
//!
//! Needs root, the `nbuser` and `nbsudoer` accounts and the kernel venv
//! (`scripts/setup.sh`); each test says why it skips when they are missing. The tests
//! take a shared lock so that their timing assertions do not compete for the CPU.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use nbagent_protocol::{CellStatus, KernelState, Message, OutputContent};
use nbagent_tests::kernel::{
    self, Notebook, Setup, Stored, children, exists, missing_prerequisite, stdout_of, tree,
};
use nbagent_tests::wait_until;
use serde_json::{Value, json};
use sha2::Digest;

/// One stack at a time: the latency assertions need the two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn skip(test: &str) -> bool {
    match missing_prerequisite() {
        Some(why) => {
            nbagent_tests::say_skip(&format!("SKIP {test}: {why}"));
            true
        }
        None => false,
    }
}

/// Starts the default stack and waits for its kernel.
async fn warm_notebook() -> Notebook {
    let nb = Notebook::start(Setup::default()).await;
    nb.wait_kernel_ready(Duration::from_secs(60)).await;
    nb
}

fn count_since(msgs: &[Stored], after: usize) -> &[Stored] {
    &msgs[after.min(msgs.len())..]
}

const ALL_OUTPUTS: &str = r#"
import sys, base64, struct, zlib
from IPython.display import display, Image, clear_output

def _chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

w, h = 16, 8
raw = b''.join(b'\x00' + bytes(v for x in range(w) for v in ((x * 16) % 256, (y * 32) % 256, 200)) for y in range(h))
png = (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 2, 0, 0, 0))
       + _chunk(b'IDAT', zlib.compress(raw)) + _chunk(b'IEND', b''))
print('png ' + base64.b64encode(png).decode(), flush=True)
print('to stderr', file=sys.stderr, flush=True)
display(Image(data=png))
handle = display({'text/plain': 'first'}, raw=True, display_id='d1')
handle.update({'text/plain': 'second'}, raw=True)
clear_output()
6 * 7
"#;

fn tag(o: &OutputContent) -> String {
    match o {
        OutputContent::Stream { name, .. } => format!("stream:{name}"),
        OutputContent::DisplayData {
            display_id: Some(id),
            ..
        } => format!("display_data:{id}"),
        OutputContent::DisplayData { .. } => "display_data".into(),
        OutputContent::UpdateDisplayData { display_id, .. } => {
            format!("update_display_data:{display_id}")
        }
        OutputContent::ClearOutput { wait } => format!("clear_output:{wait}"),
        OutputContent::ExecuteResult { .. } => "execute_result".into(),
        OutputContent::Error { .. } => "error".into(),
        _ => "other".into(),
    }
}

fn plain(data: &Value) -> String {
    match &data["text/plain"] {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        other => other.to_string(),
    }
}

/// 1. Every output kind of one cell arrives, in emission order; the PNG becomes a
///    verified blob holding exactly the bytes the kernel displayed; an error cell reports
///    ename, evalue and traceback with status Error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_of_every_kind_arrive_in_order() {
    if skip("outputs_of_every_kind_arrive_in_order") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    let r = nb.run(ALL_OUTPUTS).await;
    assert_eq!(
        r.status,
        CellStatus::Ok,
        "{:?}\n{}",
        r.outputs,
        nb.log_tail()
    );
    // One print may arrive as two stream messages: consecutive ones are joined.
    let outputs = OutputContent::coalesce_streams(&r.outputs);
    let tags: Vec<String> = outputs.iter().map(tag).collect();
    assert_eq!(
        tags,
        [
            "stream:stdout",
            "stream:stderr",
            "display_data",
            "display_data:d1",
            "update_display_data:d1",
            "clear_output:false",
            "execute_result",
        ],
        "{:#?}",
        outputs
    );

    // The PNG the kernel printed, byte for byte, is the blob the server verified.
    let printed = stdout_of(&r);
    let b64 = printed
        .trim()
        .strip_prefix("png ")
        .expect("the cell prints its PNG");
    let png = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
    let hash = hex::encode(sha2::Sha256::digest(&png));
    let OutputContent::DisplayData { data, .. } = &outputs[2] else {
        unreachable!()
    };
    assert_eq!(data["image/png"], json!({"blob": hash, "size": png.len()}));
    let blobs = &nb.server.state.blobs;
    assert!(blobs.has(&hash).unwrap(), "blob {hash} is not in the store");
    assert_eq!(blobs.read(&hash).unwrap(), png);
    let rec = nb
        .server
        .state
        .store
        .blob(&hash)
        .await
        .unwrap()
        .expect("blob record");
    assert_eq!(
        (rec.size, rec.media_type.as_str()),
        (png.len() as u64, "image/png")
    );

    assert_eq!(
        outputs[1],
        OutputContent::Stream {
            name: "stderr".into(),
            text: "to stderr\n".into()
        }
    );
    let OutputContent::DisplayData { data, .. } = &outputs[3] else {
        unreachable!()
    };
    assert_eq!(plain(data), "first");
    let OutputContent::UpdateDisplayData { data, .. } = &outputs[4] else {
        unreachable!()
    };
    assert_eq!(plain(data), "second");
    let OutputContent::ExecuteResult {
        execution_count,
        data,
        ..
    } = &outputs[6]
    else {
        unreachable!()
    };
    assert_eq!(plain(data), "42");
    assert_eq!(Some(*execution_count), r.execution_count);
    assert_eq!(r.execution_count, Some(1));

    let e = nb.run("def f():\n    return 1 / 0\nf()").await;
    assert_eq!(e.status, CellStatus::Error);
    assert_eq!(e.execution_count, Some(2));
    let [
        OutputContent::Error {
            ename,
            evalue,
            traceback,
        },
    ] = &e.outputs[..]
    else {
        panic!("one error output expected: {:?}", e.outputs)
    };
    assert_eq!(
        (ename.as_str(), evalue.as_str()),
        ("ZeroDivisionError", "division by zero")
    );
    let tb = traceback.join("\n");
    assert!(
        tb.contains("ZeroDivisionError") && tb.contains("f()"),
        "traceback: {tb}"
    );
}

/// 2. Interrupting a busy loop returns control within 2 s and keeps the kernel's state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_returns_control_and_keeps_state() {
    if skip("interrupt_returns_control_and_keeps_state") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    assert_eq!(nb.stdout("x = 'kept'\nprint('set')").await, "set\n");
    let pid_before = nb.record().expect("record").pid;

    let req = nb
        .submit("print('looping', flush=True)\nwhile True:\n    pass")
        .await;
    // The loop runs once its first line's output is stored.
    nb.wait_for("output", Duration::from_secs(10), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { request, .. } if *request == req))
            .then_some(())
    })
    .await;
    let begun = Instant::now();
    nb.command(&Message::Interrupt {
        request: "int".into(),
    })
    .await;
    let r = nb.wait(&req, Duration::from_secs(10)).await;
    let took = begun.elapsed();
    eprintln!("interrupt -> cell_finished stored: {took:?}");
    assert!(took < Duration::from_secs(2), "interrupt took {took:?}");
    assert_eq!(r.status, CellStatus::Error, "{:?}", r.outputs);
    assert!(
        r.outputs.iter().any(
            |o| matches!(o, OutputContent::Error { ename, .. } if ename == "KeyboardInterrupt")
        ),
        "{:?}",
        r.outputs
    );
    assert_eq!(nb.stdout("print(x)").await, "kept\n");
    assert_eq!(nb.record().expect("record").pid, pid_before, "same kernel");
}

/// 3. A kernel that exits is reported within 1 s with its exit code, the cell ends
///    KernelDied, the next cell gets a fresh kernel; RestartKernel also gives a fresh one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_death_and_restart() {
    if skip("kernel_death_and_restart") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    assert_eq!(nb.stdout("y = 1\nprint(y)").await, "1\n");
    let first = nb.record().expect("record");

    let died_before = nb.messages("kernel_died").await.len();
    let begun = Instant::now();
    let req = nb.submit("import os; os._exit(3)").await;
    let died = nb
        .wait_for("kernel_died", Duration::from_secs(10), |m| {
            count_since(m, died_before).first().cloned()
        })
        .await;
    let took = begun.elapsed();
    let Message::KernelDied {
        exit_code,
        signal,
        log_tail,
    } = &died.msg
    else {
        unreachable!()
    };
    assert_eq!((*exit_code, *signal), (Some(3), None));
    assert!(
        !log_tail.trim().is_empty(),
        "the death report carries no log tail"
    );
    eprintln!("log tail of the dead kernel:\n{log_tail}");
    let started = nb.messages("cell_started").await;
    let started = started
        .iter()
        .find(|s| matches!(&s.msg, Message::CellStarted { request, .. } if *request == req))
        .expect("cell_started");
    let since_start = died.row.received_at - started.row.received_at;
    eprintln!(
        "submit -> kernel_died stored: {took:?}; cell_started -> kernel_died: {since_start} ms"
    );
    assert!(took < Duration::from_secs(1), "death seen after {took:?}");
    assert!(since_start < 1000);
    let r = nb.wait(&req, Duration::from_secs(10)).await;
    assert_eq!(r.status, CellStatus::KernelDied);
    let dead = nb.messages("kernel_status").await;
    assert!(
        dead.iter().any(|s| matches!(&s.msg, Message::KernelStatus { state: KernelState::Dead, detail } if detail.contains("exited with code 3"))),
        "no dead status naming the exit code"
    );
    assert!(
        !exists(first.pid, first.start_ticks),
        "the dead kernel's init is not reaped"
    );

    // The next cell starts a new kernel: the variable is gone, the counter restarts.
    let r = nb.run("print(globals().get('y'))").await;
    assert_eq!(
        (stdout_of(&r).as_str(), r.execution_count),
        ("None\n", Some(1))
    );
    let second = nb.record().expect("record");
    assert_ne!(
        (second.pid, second.start_ticks),
        (first.pid, first.start_ticks)
    );

    // RestartKernel: same again.
    let r = nb.run("z = 5\nprint(z)").await;
    assert_eq!(
        (stdout_of(&r).as_str(), r.execution_count),
        ("5\n", Some(2))
    );
    let restarting_before = nb
        .messages("kernel_status")
        .await
        .iter()
        .filter(|s| {
            matches!(
                &s.msg,
                Message::KernelStatus {
                    state: KernelState::Restarting,
                    ..
                }
            )
        })
        .count();
    nb.command(&Message::RestartKernel {
        request: "restart".into(),
    })
    .await;
    let r = nb.run("print('z' in globals())").await;
    assert_eq!(
        (stdout_of(&r).as_str(), r.execution_count),
        ("False\n", Some(1))
    );
    let restarting_after = nb
        .messages("kernel_status")
        .await
        .iter()
        .filter(|s| {
            matches!(
                &s.msg,
                Message::KernelStatus {
                    state: KernelState::Restarting,
                    ..
                }
            )
        })
        .count();
    assert_eq!(restarting_after, restarting_before + 1);
    let third = nb.record().expect("record");
    assert_ne!(third.pid, second.pid);
    assert!(
        !exists(second.pid, second.start_ticks),
        "the restarted kernel is not gone"
    );
}

const ISOLATION: &str = r#"
import os, json
status = {}
for line in open('/proc/self/status'):
    k, _, v = line.partition(':')
    status[k] = v.strip()
reads = {}
for p in PATHS:
    try:
        open(p, 'rb').read()
        reads[p] = 'read'
    except Exception as e:
        reads[p] = type(e).__name__
print(json.dumps({
    'status': status, 'pid': os.getpid(), 'ppid': os.getppid(),
    'uid': os.getuid(), 'euid': os.geteuid(), 'gid': os.getgid(),
    'groups': os.getgroups(), 'env': dict(os.environ), 'reads': reads,
}))
"#;

/// 4. Inside the kernel: no capabilities, no_new_privs, PID 2 of its own namespace under
///    the init, the notebook user's uid, the agent's key files out of reach, and no
///    agent variables (token) in the environment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_is_isolated() {
    if skip("kernel_is_isolated") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    let identity = kernel::identity_dir(&nb.state_dir);
    let mut secrets: Vec<String> = std::fs::read_dir(&identity)
        .expect("identity dir")
        .flatten()
        .map(|e| e.path().display().to_string())
        .collect();
    secrets.sort();
    assert!(
        secrets.iter().any(|p| p.ends_with(".key")),
        "no key file in {}: {secrets:?}",
        identity.display()
    );
    secrets.push(
        nbagent::runtime::record_path(&nb.state_dir)
            .display()
            .to_string(),
    );
    let code = ISOLATION.replace("PATHS", &serde_json::to_string(&secrets).unwrap());
    let out: Value = serde_json::from_str(&nb.stdout(&code).await).expect("json");

    let st = &out["status"];
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(st[cap], "0000000000000000", "{cap}");
    }
    assert_eq!(st["NoNewPrivs"], "1");
    let user = nix::unistd::User::from_name(kernel::KERNEL_USER)
        .unwrap()
        .unwrap();
    for (k, want) in [
        ("uid", user.uid.as_raw()),
        ("euid", user.uid.as_raw()),
        ("gid", user.gid.as_raw()),
    ] {
        assert_eq!(out[k], json!(want), "{k}");
    }
    assert_eq!(
        (out["pid"].as_i64(), out["ppid"].as_i64()),
        (Some(2), Some(1))
    );
    let nspid: Vec<i32> = st["NSpid"]
        .as_str()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(nspid.len(), 2, "NSpid {nspid:?}: one level below ours");
    assert_eq!(nspid[1], 2);
    // Seen from here: the kernel is the child of the init the record names.
    let rec = nb.record().expect("record");
    assert_eq!(children(rec.pid), vec![nspid[0]]);
    assert_eq!(
        nbagent::runtime::record::proc_stat(Path::new("/proc"), nspid[0])
            .unwrap()
            .ppid,
        rec.pid
    );

    for p in &secrets {
        assert_eq!(out["reads"][p], "PermissionError", "the kernel reading {p}");
    }
    let env = out["env"].as_object().unwrap();
    let names: Vec<&String> = env.keys().collect();
    assert!(!env.contains_key("NBAGENT_TOKEN"), "{names:?}");
    assert!(!names.iter().any(|k| k.starts_with("NBAGENT")), "{names:?}");
    assert!(
        !env.values()
            .any(|v| v.as_str().is_some_and(|v| v.contains(&nb.token))),
        "the token leaked into the kernel's environment"
    );
}

/// A refused user: KERNEL_USERNAME, extra environment, what the refusal must say.
type RefusalCase = (
    &'static str,
    &'static [(&'static str, &'static str)],
    &'static [&'static str],
);

/// 5. Users who must not run kernels are refused: the cell is aborted with an error
///    output saying why and how to fix it, and the kernel status carries the same reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_users() {
    if skip("refused_users") {
        return;
    }
    if !matches!(nix::unistd::User::from_name("nbsudoer"), Ok(Some(_))) {
        nbagent_tests::say_skip(
            "SKIP refused_users: user nbsudoer does not exist (scripts/setup.sh creates it)",
        );
        return;
    }
    let _serial = SERIAL.lock().await;
    let cases: [RefusalCase; 4] = [
        (
            "root",
            &[],
            &[
                "user root is root",
                "set KERNEL_USERNAME to an unprivileged user",
            ],
        ),
        (
            "nbsudoer",
            &[],
            &[
                "user nbsudoer has sudo rights",
                "group sudo",
                "--allow-sudoers",
            ],
        ),
        (
            "nbuser",
            &[("NBAGENT_UNAUTHORIZED_USERS", "nbuser")],
            &[
                "user nbuser is on the unauthorized users list",
                "remove the user",
            ],
        ),
        (
            "nbuser",
            &[("NBAGENT_AUTHORIZED_USERS", "someoneelse")],
            &[
                "user nbuser is not on the authorized users list",
                "add the user",
            ],
        ),
    ];
    for (user, env, says) in cases {
        let nb = Notebook::start(Setup {
            kernel_user: user.into(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Setup::default()
        })
        .await;
        let r = nb.run("print('must not run')").await;
        let ctx = format!("user {user} {env:?}: {:?}", r.outputs);
        assert_eq!(r.status, CellStatus::Aborted, "{ctx}");
        let [OutputContent::Error { ename, evalue, .. }] = &r.outputs[..] else {
            panic!("one error output expected: {ctx}")
        };
        assert_eq!(ename, "KernelNotStarted", "{ctx}");
        // Every message names the user's refusal and the kernel it was for.
        let says: Vec<&str> = says.iter().copied().chain(["kernel python3"]).collect();
        for s in &says {
            assert!(evalue.contains(s), "{ctx}: evalue lacks {s:?}");
        }
        let statuses = nb.messages("kernel_status").await;
        assert!(
            statuses.iter().any(|s| matches!(&s.msg, Message::KernelStatus { state: KernelState::Dead, detail } if says.iter().all(|w| detail.contains(w)))),
            "{ctx}: no dead status with the reason: {statuses:?}"
        );
        assert!(nb.record().is_none(), "{ctx}: a kernel record exists");
        let procs = tree(nb.supervisor_pid());
        assert!(
            procs
                .iter()
                .all(|p| !p.cmdline.iter().any(|a| a == "__kernel-init")),
            "{ctx}: a kernel process runs: {procs:?}"
        );
    }
}

/// 6. SIGKILL to the agent mid-cell: the kernel survives with its state, nbsupervisor
///    restarts the agent, the new agent adopts the kernel, reports an output gap for the
///    running cell and collects the rest of it, and the next cell sees the variables. Restarting the adopted
///    kernel (now an orphan of nbsupervisor) leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crash_keeps_the_kernel() {
    if skip("agent_crash_keeps_the_kernel") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    assert_eq!(nb.stdout("print('warm')").await, "warm\n");
    let before = nb.record().expect("record");
    let agent = nb.agent_pid().expect("agent pid");

    let req = nb
        .submit("import time; x = 42; print('started', flush=True); time.sleep(3); print('done')")
        .await;
    nb.wait_for("output", Duration::from_secs(10), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { request, .. } if *request == req))
            .then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let mut next_agent = None;
    assert!(
        wait_until(Duration::from_secs(10), || {
            next_agent = nb.agent_pid().filter(|&p| p != agent);
            next_agent.is_some()
        }),
        "nbsupervisor did not restart the agent\n{}",
        nb.log_tail()
    );
    // The kernel lived through it: same init process.
    assert!(
        exists(before.pid, before.start_ticks),
        "the kernel died with the agent"
    );

    // The new agent adopted it and says outputs of the running cell may be lost.
    let gap = nb
        .wait_for("output_gap", Duration::from_secs(20), |m| {
            m.first().cloned()
        })
        .await;
    let Message::OutputGap { cell, reason } = &gap.msg else {
        unreachable!()
    };
    let r = nb.wait(&req, Duration::from_secs(20)).await;
    assert_eq!(cell.as_deref(), Some(r.cell.as_str()), "{reason}");
    eprintln!(
        "interrupted cell: {:?}, outputs {:?}; gap: {reason}",
        r.status, r.outputs
    );
    // The new agent collected the rest of the cell: its end and the output printed
    // after the adoption ('done'). The command was not delivered again: 'started' once.
    assert_eq!(r.status, CellStatus::Ok, "{:?}", r.outputs);
    assert_eq!(
        OutputContent::coalesce_streams(&r.outputs),
        [OutputContent::Stream {
            name: "stdout".into(),
            text: "started\ndone\n".into()
        }],
        "{:?}",
        r.outputs
    );
    assert!(r.duration_ms >= 3000, "duration {} ms", r.duration_ms);
    let after = nb.record().expect("record");
    assert_eq!(
        (after.pid, after.start_ticks),
        (before.pid, before.start_ticks)
    );
    let statuses = nb.messages("kernel_status").await;
    assert!(statuses.iter().any(|s| matches!(&s.msg, Message::KernelStatus { detail, .. } if detail.contains(&format!("adopted running kernel (pid {})", before.pid)))));

    let r = nb.run("print(x == 42, x)").await;
    assert_eq!(r.status, CellStatus::Ok, "{:?}", r.outputs);
    assert_eq!(stdout_of(&r), "True 42\n");

    // The adopted init is now nbsupervisor's child: a restart must leave it reaped.
    nb.command(&Message::RestartKernel {
        request: "restart".into(),
    })
    .await;
    assert_eq!(nb.stdout("print('x' in globals())").await, "False\n");
    assert!(
        wait_until(Duration::from_secs(5), || !exists(
            before.pid,
            before.start_ticks
        )),
        "the adopted kernel's init was not reaped after the restart: {:?}",
        nbagent::runtime::record::proc_stat(Path::new("/proc"), before.pid)
    );
    let zombies: Vec<_> = tree(nb.supervisor_pid())
        .into_iter()
        .filter(|p| p.state == 'Z')
        .collect();
    assert!(zombies.is_empty(), "zombies: {zombies:?}");
}

/// 6b. SIGKILL to the agent while a cell loops forever: the new agent adopts the busy
///     kernel at once (it does not wait for the cell to end), follows the cell, and an
///     interrupt ends it; the kernel's state is intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_crash_in_a_busy_loop_can_be_interrupted() {
    if skip("agent_crash_in_a_busy_loop_can_be_interrupted") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    let agent = nb.agent_pid().expect("agent pid");
    let req = nb
        .submit("x = 7\nprint('looping', flush=True)\nwhile True:\n    pass")
        .await;
    nb.wait_for("output", Duration::from_secs(10), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { request, .. } if *request == req))
            .then_some(())
    })
    .await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    nb.wait_for("output_gap", Duration::from_secs(20), |m| {
        m.first().cloned()
    })
    .await;
    // The new agent follows the loop; an interrupt ends it like any cell.
    let begun = Instant::now();
    nb.command(&Message::Interrupt {
        request: "int".into(),
    })
    .await;
    let r = nb.wait(&req, Duration::from_secs(10)).await;
    assert!(
        begun.elapsed() < Duration::from_secs(2),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(r.status, CellStatus::Error, "{:?}", r.outputs);
    assert!(
        r.outputs.iter().any(
            |o| matches!(o, OutputContent::Error { ename, .. } if ename == "KeyboardInterrupt")
        ),
        "{:?}",
        r.outputs
    );
    let req = nb.submit("print(x)").await;
    let r = nb.wait(&req, Duration::from_secs(10)).await;
    assert_eq!((r.status, stdout_of(&r).as_str()), (CellStatus::Ok, "7\n"));
}

const ORPHANS: &str = r#"
import os, subprocess
subprocess.Popen(['sh', '-c', 'sleep 600.51 &']).wait()
pid = os.fork()
if pid == 0:
    if os.fork() == 0:
        os.execv('/bin/sleep', ['sleep', '600.52'])
    os._exit(0)
os.waitpid(pid, 0)
print('spawned')
"#;

/// 7. Orphans the notebook abandons are reaped: once they end, no zombie is left
///    anywhere under nbsupervisor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_children_are_reaped() {
    if skip("abandoned_children_are_reaped") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    let rec = nb.record().expect("record");
    assert_eq!(nb.stdout(ORPHANS).await, "spawned\n");
    let sup = nb.supervisor_pid();
    let is_orphan = |p: &kernel::ProcInfo| {
        p.cmdline.first().is_some_and(|a| a == "sleep")
            && p.cmdline
                .get(1)
                .is_some_and(|a| a == "600.51" || a == "600.52")
    };
    let orphans: Vec<_> = tree(sup).into_iter().filter(is_orphan).collect();
    assert_eq!(
        orphans.len(),
        2,
        "both sleeps run under nbsupervisor: {orphans:?}"
    );
    for o in &orphans {
        // Their parents exited: they were reparented to the namespace's init.
        assert_eq!(o.ppid, rec.pid, "{o:?}");
    }
    // They end (killed here, so that the test does not depend on how long the machine
    // took to get this far); whoever reaps them must leave no zombie.
    for o in &orphans {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(o.pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill an orphan");
    }
    let mut left = Vec::new();
    let clean = wait_until(Duration::from_secs(10), || {
        left = tree(sup)
            .into_iter()
            .filter(|p| p.state == 'Z' || is_orphan(p))
            .collect();
        left.is_empty()
    });
    assert!(clean, "left under nbsupervisor: {left:?}");
    assert_eq!(nb.stdout("print('alive')").await, "alive\n");
}

/// 8. Shutdown: nbsupervisor exits 0 and no kernel process remains.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_everything() {
    if skip("shutdown_stops_everything") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut nb = warm_notebook().await;
    assert_eq!(nb.stdout("print('hi')").await, "hi\n");
    let rec = nb.record().expect("record");
    let kernel_pids = children(rec.pid);
    assert_eq!(kernel_pids.len(), 1, "the init runs the kernel");
    let kernel_start = nbagent::runtime::record::proc_stat(Path::new("/proc"), kernel_pids[0])
        .unwrap()
        .start_ticks;
    let agent = nb.agent_pid().expect("agent");
    let agent_start = nbagent::runtime::record::proc_stat(Path::new("/proc"), agent)
        .unwrap()
        .start_ticks;
    nb.command(&Message::Shutdown {
        reason: "test".into(),
        deadline_ms: 10_000,
    })
    .await;
    let status = nb
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("nbsupervisor did not exit\n{}", nb.log_tail()));
    assert_eq!(status.code(), Some(0), "{}", nb.log_tail());
    for (what, pid, start) in [
        ("kernel init", rec.pid, rec.start_ticks),
        ("kernel", kernel_pids[0], kernel_start),
        ("agent", agent, agent_start),
    ] {
        assert!(!exists(pid, start), "the {what} (pid {pid}) is still there");
    }
    assert!(nb.record().is_none(), "the kernel record is left behind");
    let statuses = nb.messages("kernel_status").await;
    assert!(
        statuses.iter().any(|s| matches!(&s.msg, Message::KernelStatus { state: KernelState::Dead, detail } if detail == "shut down")),
        "{statuses:?}"
    );
}

/// 9. SIGTERM to nbsupervisor (the orderly path): the agent interrupts the running
///    cell, stops the kernel and removes its record before it drains the outbox, so
///    nbsupervisor exits 0 within its deadline, no process of the kernel is left, and
///    every output of both cells, their ends and the final status are on the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_the_kernel_in_order() {
    if skip("sigterm_stops_the_kernel_in_order") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let mut nb = warm_notebook().await;
    let done = nb
        .run("import sys\nprint('one', flush=True)\nprint('two', file=sys.stderr, flush=True)\n6 * 7")
        .await;
    assert_eq!(done.status, CellStatus::Ok, "{:?}", done.outputs);
    let rec = nb.record().expect("record");
    let kernel_pids = children(rec.pid);
    assert_eq!(kernel_pids.len(), 1, "the init runs the kernel");
    let kernel_start = nbagent::runtime::record::proc_stat(Path::new("/proc"), kernel_pids[0])
        .unwrap()
        .start_ticks;

    // A second cell is still running when the signal comes.
    let req = nb
        .submit("import time\nprint('started', flush=True)\ntime.sleep(60)")
        .await;
    nb.wait_for("output", Duration::from_secs(10), |m| {
        m.iter()
            .any(|s| matches!(&s.msg, Message::Output { request, .. } if *request == req))
            .then_some(())
    })
    .await;
    let begun = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nb.supervisor_pid()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = nb
        .wait_exit(Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("nbsupervisor did not exit\n{}", nb.log_tail()));
    let took = begun.elapsed();
    eprintln!("SIGTERM -> nbsupervisor exited: {took:?}");
    assert_eq!(status.code(), Some(0), "{}", nb.log_tail());
    // The harness gives nbsupervisor a 20 s deadline.
    assert!(took < Duration::from_secs(20), "took {took:?}");
    for (what, pid, start) in [
        ("kernel init", rec.pid, rec.start_ticks),
        ("kernel", kernel_pids[0], kernel_start),
    ] {
        assert!(!exists(pid, start), "the {what} (pid {pid}) is still there");
    }
    assert!(
        !nbagent::runtime::record_path(&nb.state_dir).exists(),
        "the kernel record is left behind"
    );

    // Everything was delivered before the agent exited: no waiting here.
    let finished = nb.messages("cell_finished").await;
    for request in [&done.request, &req] {
        assert!(
            finished.iter().any(
                |s| matches!(&s.msg, Message::CellFinished { request: r, .. } if r == request)
            ),
            "no cell_finished for {request}"
        );
    }
    let outputs = nb.messages("output").await;
    // One print may arrive as two stream messages: consecutive ones are joined.
    let cell_outputs = |request: &str| -> Vec<String> {
        let of_cell: Vec<OutputContent> = outputs
            .iter()
            .filter_map(|s| match &s.msg {
                Message::Output {
                    request: r, output, ..
                } if r == request => Some(output.clone()),
                _ => None,
            })
            .collect();
        OutputContent::coalesce_streams(&of_cell)
            .iter()
            .map(tag)
            .collect()
    };
    assert_eq!(
        cell_outputs(&done.request),
        ["stream:stdout", "stream:stderr", "execute_result"]
    );
    assert_eq!(cell_outputs(&req), ["stream:stdout", "error"]);
    let interrupted = nb.wait(&req, Duration::from_secs(1)).await;
    assert_eq!(interrupted.status, CellStatus::Error);
    assert!(
        interrupted.outputs.iter().any(
            |o| matches!(o, OutputContent::Error { ename, .. } if ename == "KeyboardInterrupt")
        ),
        "{:?}",
        interrupted.outputs
    );
    let statuses = nb.messages("kernel_status").await;
    let last = statuses.last().expect("kernel statuses");
    assert!(
        matches!(&last.msg, Message::KernelStatus { state: KernelState::Dead, detail } if detail.contains("SIGTERM")),
        "the last status is not the stop: {:?}",
        last.msg
    );
    assert!(
        nb.messages("kernel_died").await.is_empty(),
        "an orderly stop is not a death"
    );
}

/// A kernel that asks for input although the request said `allow_stdin: false`: made
/// here through ipykernel's own `_input_request`, which skips that check.
const FORCED_INPUT: &str = r#"
k = get_ipython().kernel
try:
    k._input_request('forced? ', k._parent_ident['shell'], k.get_parent('shell'), password=False)
    print('answered')
except EOFError:
    print('end of file')
"#;

/// 10. stdin: `input()` ends the cell with a clear error (the agent sends
///     `allow_stdin: false`, ipykernel raises `StdinNotImplementedError` saying the
///     frontend does not support input requests), and the kernel keeps working. A kernel
///     that sends an `input_request` anyway is answered at once with end of file and the
///     cell shows why on stderr; it does not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn input_gets_a_clear_error() {
    if skip("input_gets_a_clear_error") {
        return;
    }
    let _serial = SERIAL.lock().await;
    let nb = warm_notebook().await;
    let r = nb.run("x = 1\nname = input('name? ')\nx = 2").await;
    assert_eq!(r.status, CellStatus::Error, "{:?}", r.outputs);
    let [OutputContent::Error { ename, evalue, .. }] = &r.outputs[..] else {
        panic!("one error output expected: {:?}", r.outputs)
    };
    assert_eq!(ename, "StdinNotImplementedError");
    assert!(
        evalue.contains("does not support input requests"),
        "{evalue}"
    );
    assert_eq!(nb.stdout("print(x)").await, "1\n");

    let r = nb
        .wait(&nb.submit(FORCED_INPUT).await, Duration::from_secs(10))
        .await;
    assert_eq!(r.status, CellStatus::Ok, "{:?}", r.outputs);
    assert_eq!(stdout_of(&r), "end of file\n");
    let stderr = kernel::stream_of(&r, "stderr");
    assert!(
        stderr.contains("stdin is not supported") && stderr.contains("forced? "),
        "{stderr:?}"
    );
    assert_eq!(nb.stdout("print(x + 1)").await, "2\n");
}
