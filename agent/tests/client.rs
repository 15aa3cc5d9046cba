//! The kernel client against a real ipykernel from /opt/nbagent/venv.
//!
//! Each test starts its own kernel (TCP on 127.0.0.1, its own process group, stdin
//! /dev/null, no JPY_PARENT_PID) and kills it at the end. Tests skip, saying why, when
//! that Python is missing.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nbagent::kernel::client::{
    ClientError, ConnectionInfo, ExecEvent, ExecOutcome, KernelClient, connection_file_json,
    new_connection_info,
};
use nbagent_protocol::{CellStatus, KernelState, OutputContent};
use serde_json::{Value, json};

const PYTHON: &str = "/opt/nbagent/venv/bin/python";
const CONNECT: Duration = Duration::from_secs(60);

/// A 1x1 PNG.
const PNG_B64: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg==";

struct Kernel {
    child: Child,
    info: ConnectionInfo,
    dir: tempfile::TempDir,
}

impl Kernel {
    /// Starts a kernel, or says why it cannot and returns `None`.
    fn start() -> Option<Kernel> {
        if !Path::new(PYTHON).exists() {
            nbagent_testkit::say_skip(&format!(
                "skipping: {PYTHON} not found (the kernel venv is not installed)"
            ));
            return None;
        }
        let info = new_connection_info("127.0.0.1", "python3").expect("connection info");
        Some(Self::start_with(info))
    }

    /// Starts a kernel on the given ports and key (a restart reuses them).
    fn start_with(info: ConnectionInfo) -> Kernel {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("kernel.json");
        std::fs::write(&file, connection_file_json(&info).expect("json")).expect("write");
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.path().join("kernel.log"))
            .expect("log");
        let child = Command::new(PYTHON)
            .args(["-m", "ipykernel_launcher", "-f"])
            .arg(&file)
            .arg("--HistoryManager.enabled=False")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .env_remove("JPY_PARENT_PID")
            .current_dir(dir.path())
            .process_group(0)
            .spawn()
            .expect("spawn ipykernel");
        Kernel { child, info, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("kernel.log")).unwrap_or_default()
    }

    /// Waits (polling the process, bounded) until the kernel has exited.
    fn wait_exit(&mut self, within: Duration) -> bool {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(kernel: &Kernel) -> KernelClient {
    // RUST_LOG=nbagent=debug shows the handshake.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    match KernelClient::connect(&kernel.info, CONNECT).await {
        Ok(c) => c,
        Err(e) => panic!("connect failed: {e:?}\nkernel log:\n{}", kernel.log()),
    }
}

async fn run(client: &mut KernelClient, code: &str) -> (ExecOutcome, Vec<ExecEvent>) {
    let mut events = Vec::new();
    let outcome = client
        .execute(code, &mut |e| events.push(e))
        .await
        .expect("execute");
    (outcome, events)
}

/// The outputs among `events`, consecutive texts of a stream joined (one `print` may
/// arrive as two messages).
fn outputs(events: &[ExecEvent]) -> Vec<OutputContent> {
    let all: Vec<OutputContent> = events
        .iter()
        .filter_map(|e| match e {
            ExecEvent::Output(o) => Some(o.clone()),
            _ => None,
        })
        .collect();
    OutputContent::coalesce_streams(&all)
}

fn plain(data: &Value) -> &str {
    data["text/plain"].as_str().unwrap_or_default()
}

#[tokio::test]
async fn connect_and_kernel_info_on_a_starting_kernel() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let t = Instant::now();
    let client = connect(&kernel).await;
    println!("connected to a starting kernel in {:?}", t.elapsed());
    let k = client.kernel_info();
    assert!(k.protocol_version.starts_with("5."), "{k:?}");
    assert_eq!(k.implementation, "ipython");
    assert_eq!(k.language, "python");
    assert!(!client.session().is_empty());
}

#[tokio::test]
async fn outputs_of_every_kind_arrive_in_order() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    let code = format!(
        r#"
import sys, base64
from IPython.display import display, Markdown, HTML, Image, clear_output
print("out 1", flush=True)
print("err 1", file=sys.stderr, flush=True)
display(Markdown("**md**"))
display(HTML("<b>html</b>"))
h = display("first", display_id=True)
h.update("second")
print("before clear", flush=True)
clear_output()
display(Image(data=base64.b64decode("{PNG_B64}")))
print("out 2", flush=True)
6 * 7
"#
    );
    let (outcome, events) = run(&mut client, &code).await;
    assert_eq!(outcome.status, CellStatus::Ok);
    let count = outcome.execution_count.expect("execution count");
    assert_eq!(events.first(), Some(&ExecEvent::Status(KernelState::Busy)));
    assert_eq!(events.last(), Some(&ExecEvent::Status(KernelState::Idle)));
    assert!(events.contains(&ExecEvent::Input {
        execution_count: Some(count)
    }));
    let out = outputs(&events);
    let stream = |name: &str, text: &str| OutputContent::Stream {
        name: name.into(),
        text: text.into(),
    };
    assert_eq!(out.len(), 11, "{out:#?}");
    assert_eq!(out[0], stream("stdout", "out 1\n"));
    assert_eq!(out[1], stream("stderr", "err 1\n"));
    let OutputContent::DisplayData { data, .. } = &out[2] else {
        panic!("markdown: {:?}", out[2])
    };
    assert_eq!(data["text/markdown"], "**md**");
    let OutputContent::DisplayData { data, .. } = &out[3] else {
        panic!("html: {:?}", out[3])
    };
    assert_eq!(data["text/html"], "<b>html</b>");
    let OutputContent::DisplayData {
        data,
        display_id: Some(id),
        ..
    } = &out[4]
    else {
        panic!("display with id: {:?}", out[4])
    };
    assert_eq!(plain(data), "'first'");
    let OutputContent::UpdateDisplayData {
        data,
        display_id: updated,
        ..
    } = &out[5]
    else {
        panic!("update: {:?}", out[5])
    };
    assert_eq!(updated, id);
    assert_eq!(plain(data), "'second'");
    assert_eq!(out[6], stream("stdout", "before clear\n"));
    assert_eq!(out[7], OutputContent::ClearOutput { wait: false });
    let OutputContent::DisplayData { data, .. } = &out[8] else {
        panic!("image: {:?}", out[8])
    };
    assert_eq!(data["image/png"].as_str().map(str::trim), Some(PNG_B64));
    assert_eq!(out[9], stream("stdout", "out 2\n"));
    assert_eq!(
        out[10],
        OutputContent::ExecuteResult {
            execution_count: count,
            data: json!({"text/plain": "42"}),
            metadata: json!({}),
        }
    );

    // A matplotlib figure through the inline backend is image/png display data.
    let (outcome, events) = run(
        &mut client,
        "import matplotlib\nmatplotlib.use('module://matplotlib_inline.backend_inline')\n\
         import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()",
    )
    .await;
    assert_eq!(outcome.status, CellStatus::Ok, "{events:#?}");
    let png = outputs(&events).into_iter().find_map(|o| match o {
        OutputContent::DisplayData { data, .. } => data["image/png"].as_str().map(str::to_owned),
        _ => None,
    });
    let png = png.expect("a figure");
    assert!(png.starts_with("iVBORw0KGgo"), "not a base64 png");
}

#[tokio::test]
async fn an_error_cell_reports_the_exception() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    let (outcome, events) = run(&mut client, "1 / 0").await;
    assert_eq!(outcome.status, CellStatus::Error);
    assert_eq!(outcome.ename.as_deref(), Some("ZeroDivisionError"));
    assert_eq!(outcome.evalue.as_deref(), Some("division by zero"));
    let out = outputs(&events);
    let [
        OutputContent::Error {
            ename,
            evalue,
            traceback,
        },
    ] = out.as_slice()
    else {
        panic!("one error output expected: {out:#?}")
    };
    assert_eq!(ename, "ZeroDivisionError");
    assert_eq!(evalue, "division by zero");
    assert!(!traceback.is_empty());
    // The kernel goes on.
    let (outcome, _) = run(&mut client, "pass").await;
    assert_eq!(outcome.status, CellStatus::Ok);
}

#[tokio::test]
async fn a_large_output_arrives_whole() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    let (outcome, events) = run(
        &mut client,
        "from IPython.display import display\n\
         display({'application/octet-stream': 'y' * 8_000_000}, raw=True)",
    )
    .await;
    assert_eq!(outcome.status, CellStatus::Ok, "{events:?}");
    let sizes: Vec<usize> = outputs(&events)
        .iter()
        .filter_map(|o| match o {
            OutputContent::DisplayData { data, .. } => {
                data["application/octet-stream"].as_str().map(str::len)
            }
            _ => None,
        })
        .collect();
    assert_eq!(sizes, [8_000_000]);
}

#[tokio::test]
async fn input_without_stdin_raises_a_clear_error() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    let (outcome, events) = run(&mut client, "input('name? ')").await;
    assert_eq!(outcome.status, CellStatus::Error);
    assert_eq!(outcome.ename.as_deref(), Some("StdinNotImplementedError"));
    let err = outputs(&events).into_iter().find_map(|o| match o {
        OutputContent::Error { ename, evalue, .. } => Some((ename, evalue)),
        _ => None,
    });
    let (ename, evalue) = err.expect("error output");
    println!("input() without stdin: {ename}: {evalue}");
    assert_eq!(ename, "StdinNotImplementedError");
    // ipykernel 7.4's wording (`Kernel.raw_input` in kernelbase.py when allow_stdin is false).
    assert_eq!(
        evalue,
        "raw_input was called, but this frontend does not support input requests."
    );
}

#[tokio::test]
async fn interrupt_request_stops_a_busy_loop_and_keeps_state() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    let (outcome, _) = run(&mut client, "x = 41").await;
    assert_eq!(outcome.status, CellStatus::Ok);

    let control = client.control();
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    let mut interrupted_at = None;
    let mut events = Vec::new();
    let (outcome, ()) = tokio::join!(
        client.execute_to("print('spinning', flush=True)\nwhile True: pass", &tx),
        async {
            while let Some(e) = rx.recv().await {
                if matches!(&e, ExecEvent::Output(OutputContent::Stream { text, .. }) if text.contains("spinning"))
                {
                    interrupted_at = Some(Instant::now());
                    control
                        .interrupt_request()
                        .await
                        .expect("interrupt_request");
                }
                let idle = e == ExecEvent::Status(KernelState::Idle);
                events.push(e);
                if idle {
                    break;
                }
            }
        }
    );
    let outcome = outcome.expect("execute");
    let after = interrupted_at.expect("the loop started").elapsed();
    println!("interrupt_request: cell ended {after:?} after the request was sent");
    assert!(after < Duration::from_secs(2), "{after:?}");
    assert_eq!(outcome.status, CellStatus::Error);
    assert_eq!(outcome.ename.as_deref(), Some("KeyboardInterrupt"));
    assert!(
        outputs(&events).iter().any(
            |o| matches!(o, OutputContent::Error { ename, .. } if ename == "KeyboardInterrupt")
        )
    );

    let (outcome, events) = run(&mut client, "x + 1").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    let out = outputs(&events);
    assert!(
        matches!(out.as_slice(), [OutputContent::ExecuteResult { data, .. }] if plain(data) == "42"),
        "{out:#?}"
    );
}

#[tokio::test]
async fn a_fresh_client_adopts_a_running_kernel() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut first = connect(&kernel).await;
    let (outcome, _) = run(&mut first, "kept = 'from the first client'").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    drop(first);

    let mut second = connect(&kernel).await;
    let (outcome, events) = run(&mut second, "kept").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    let out = outputs(&events);
    assert!(
        matches!(out.as_slice(), [OutputContent::ExecuteResult { data, .. }] if plain(data) == "'from the first client'"),
        "{out:#?}"
    );
}

#[tokio::test]
async fn a_second_simultaneous_client_connects_without_a_welcome() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut first = connect(&kernel).await;
    let mut second = connect(&kernel).await;
    let (outcome, _) = run(&mut first, "shared = 1").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    let (outcome, events) = run(&mut second, "shared + 1").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    assert!(
        matches!(outputs(&events).as_slice(), [OutputContent::ExecuteResult { data, .. }] if plain(data) == "2")
    );
    // The first client skips what the second's request caused.
    let (outcome, events) = run(&mut first, "print('only mine')").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    assert_eq!(
        outputs(&events),
        [OutputContent::Stream {
            name: "stdout".into(),
            text: "only mine\n".into()
        }]
    );
}

#[tokio::test]
async fn a_fresh_client_works_after_a_restart_on_the_same_ports() {
    let Some(mut kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    run(&mut client, "before = 1").await;
    kernel.child.kill().expect("kill");
    kernel.child.wait().expect("reap");
    drop(client);

    let kernel = Kernel::start_with(kernel.info.clone());
    let mut client = connect(&kernel).await;
    let (outcome, events) = run(&mut client, "'before' in globals()").await;
    assert_eq!(outcome.status, CellStatus::Ok);
    assert_eq!(outcome.execution_count, Some(1));
    assert!(
        matches!(outputs(&events).as_slice(), [OutputContent::ExecuteResult { data, .. }] if plain(data) == "False")
    );
}

#[tokio::test]
async fn heartbeat_follows_the_kernel_process() {
    let Some(mut kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    assert!(client.heartbeat(Duration::from_secs(2)).await);
    assert!(client.heartbeat(Duration::from_secs(2)).await);
    kernel.child.kill().expect("kill");
    kernel.child.wait().expect("reap");
    assert!(!client.heartbeat(Duration::from_millis(500)).await);
    assert!(!client.heartbeat(Duration::from_millis(500)).await);
}

#[tokio::test]
async fn shutdown_request_stops_the_kernel() {
    let Some(mut kernel) = Kernel::start() else {
        return;
    };
    let client = connect(&kernel).await;
    client
        .control()
        .shutdown_request(false)
        .await
        .expect("shutdown_request");
    // ipykernel 7 acknowledges and then, rarely (seen about once in ten suite runs on
    // a loaded 2-core machine), keeps running; the test asks a second time before
    // giving up. (The agent itself falls back to SIGKILL after a grace period.)
    if !kernel.wait_exit(Duration::from_secs(10)) {
        eprintln!("kernel still runs 10 s after shutdown_request; asking again");
        if let Err(e) = client.control().shutdown_request(false).await {
            eprintln!("second shutdown_request: {e}");
        }
    }
    assert!(
        kernel.wait_exit(Duration::from_secs(20)),
        "kernel still runs after two shutdown_requests; its log:\n{}",
        kernel.log()
    );
}

#[tokio::test]
async fn round_trip_of_pass() {
    let Some(kernel) = Kernel::start() else {
        return;
    };
    let mut client = connect(&kernel).await;
    run(&mut client, "pass").await;
    let mut times: Vec<Duration> = Vec::with_capacity(200);
    for _ in 0..200 {
        let t = Instant::now();
        let (outcome, _) = run(&mut client, "pass").await;
        times.push(t.elapsed());
        assert_eq!(outcome.status, CellStatus::Ok);
    }
    times.sort_unstable();
    println!(
        "round trip of `pass` over 200 executions: median {:?}, p90 {:?}, max {:?}",
        times[100], times[180], times[199]
    );
}

#[tokio::test]
async fn connect_to_no_kernel_times_out() {
    let info = new_connection_info("127.0.0.1", "python3").expect("connection info");
    let t = Instant::now();
    let err = KernelClient::connect(&info, Duration::from_millis(300))
        .await
        .expect_err("nobody listens");
    assert!(
        matches!(err, ClientError::Timeout { .. }),
        "unexpected error: {err:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}
