//! One request to `criu swrk` over a `SOCK_SEQPACKET` socketpair.
//!
//! CRIU's RPC is one protobuf message per datagram. The child end of the socketpair is
//! handed to `criu swrk` as its standard input (`criu swrk 0`), which is the one way
//! to pass a descriptor to a child without `unsafe` code. CRIU resolves the
//! descriptors named in a request (`images_dir_fd`, `work_dir_fd`) through
//! `/proc/<peer>/fd/`, so the request carries paths instead where it can.
//!
//! `NOTIFY` messages (notify scripts) are acknowledged with success and otherwise
//! ignored; the loop ends at the response of the request's own type.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use nix::sys::socket::{AddressFamily, MsgFlags, SockFlag, SockType, recv, send, socketpair};
use protobuf::{Message, MessageField};
use rust_criu::rust_criu_protobuf::rpc;

use crate::error::CriuError;

/// Largest response accepted from CRIU (responses are a few hundred bytes).
const MAX_RESPONSE: usize = 1 << 20;

/// Runs one request through a fresh `criu swrk` and returns its final response.
///
/// `stderr` receives the worker's standard error (early failures that happen before
/// CRIU opens its log file), `None` discards it.
pub(crate) fn call(
    binary: &Path,
    req_type: rpc::Criu_req_type,
    opts: Option<rpc::Criu_opts>,
    features: Option<rpc::Criu_features>,
    stderr: Option<File>,
) -> Result<rpc::Criu_resp, CriuError> {
    call_as(binary, None, req_type, opts, features, stderr)
}

/// Longest a CRIU request may take (a 2 GB dump takes about 1.5 s here).
pub(crate) const RPC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(180);

/// The capabilities an unprivileged CRIU worker keeps (see [`crate::RunAs`]).
const UNPRIVILEGED_CAPS: &str = "+checkpoint_restore,+sys_ptrace,+sys_admin,+setpcap,+setuid,+setgid,+dac_override,+dac_read_search,+net_admin,+fowner,+chown";

/// [`call`], with the worker running as `run_as` (through `setpriv`) when given.
pub(crate) fn call_as(
    binary: &Path,
    run_as: Option<crate::RunAs>,
    req_type: rpc::Criu_req_type,
    opts: Option<rpc::Criu_opts>,
    features: Option<rpc::Criu_features>,
    stderr: Option<File>,
) -> Result<rpc::Criu_resp, CriuError> {
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|source| CriuError::Socket { source })?;

    let mut cmd = match run_as {
        None => Command::new(binary),
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--clear-groups")
                .arg(format!("--inh-caps={UNPRIVILEGED_CAPS}"))
                .arg(format!("--ambient-caps={UNPRIVILEGED_CAPS}"))
                .arg("--")
                .arg(binary);
            c
        }
    };
    cmd.arg("swrk")
        .arg("0")
        .stdin(Stdio::from(theirs))
        .stdout(Stdio::null())
        .stderr(match stderr {
            Some(f) => Stdio::from(f),
            None => Stdio::null(),
        });
    let mut child = cmd.spawn().map_err(|source| CriuError::Spawn {
        binary: binary.to_path_buf(),
        source,
    })?;
    // `cmd` still owns our copy of the child's end: drop it so that a dying worker
    // shows up as end of file on our end.
    drop(cmd);

    // A worker that neither answers nor exits (a restore stuck on tasks that hit a
    // BUG) must not hang the agent: give up after RPC_TIMEOUT and kill it.
    if let Err(e) = nix::sys::socket::setsockopt(
        &ours,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(RPC_TIMEOUT.as_secs() as i64, 0),
    ) {
        tracing::warn!(error = %e, "cannot set a timeout on the criu socket");
    }
    let mut result = exchange(&ours, req_type, opts, features);
    if let Err(CriuError::Socket { source }) = &result
        && matches!(source, nix::errno::Errno::EAGAIN)
    {
        tracing::warn!(
            timeout_secs = RPC_TIMEOUT.as_secs(),
            "criu swrk did not answer; killing it"
        );
        let _ = child.kill();
        result = Err(CriuError::Timeout { after: RPC_TIMEOUT });
    }
    drop(ours);
    // The worker exits after answering (or after the socket closes).
    let status = child.wait();
    let resp = result?;
    if let Err(source) = status {
        tracing::warn!(error = %source, "cannot reap criu swrk");
    }
    Ok(resp)
}

fn exchange(
    sock: &OwnedFd,
    req_type: rpc::Criu_req_type,
    opts: Option<rpc::Criu_opts>,
    features: Option<rpc::Criu_features>,
) -> Result<rpc::Criu_resp, CriuError> {
    let mut req = rpc::Criu_req::new();
    req.set_type(req_type);
    if let Some(opts) = opts {
        req.opts = MessageField::some(opts);
    }
    if let Some(features) = features {
        req.features = MessageField::some(features);
    }
    send_msg(sock, &req)?;
    loop {
        let resp = recv_msg(sock)?;
        let ty = resp.type_();
        if ty == rpc::Criu_req_type::NOTIFY {
            tracing::debug!(script = resp.notify.script(), "criu notify");
            let mut ack = rpc::Criu_req::new();
            ack.set_type(rpc::Criu_req_type::NOTIFY);
            ack.set_notify_success(true);
            send_msg(sock, &ack)?;
            continue;
        }
        if ty != req_type {
            return Err(CriuError::Protocol {
                reason: format!("response of type {ty:?} to a {req_type:?} request"),
            });
        }
        return Ok(resp);
    }
}

fn send_msg(sock: &OwnedFd, req: &rpc::Criu_req) -> Result<(), CriuError> {
    let bytes = req
        .write_to_bytes()
        .map_err(|source| CriuError::Protobuf { source })?;
    let n = send(sock.as_raw_fd(), &bytes, MsgFlags::empty())
        .map_err(|source| CriuError::Socket { source })?;
    if n != bytes.len() {
        return Err(CriuError::Protocol {
            reason: format!("short write to criu swrk ({n} of {} bytes)", bytes.len()),
        });
    }
    Ok(())
}

fn recv_msg(sock: &OwnedFd) -> Result<rpc::Criu_resp, CriuError> {
    // MSG_PEEK | MSG_TRUNC with an empty buffer returns the datagram's real length.
    let len = recv(
        sock.as_raw_fd(),
        &mut [],
        MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC,
    )
    .map_err(|source| CriuError::Socket { source })?;
    if len == 0 {
        return Err(CriuError::WorkerGone);
    }
    if len > MAX_RESPONSE {
        return Err(CriuError::Protocol {
            reason: format!("response of {len} bytes is too large"),
        });
    }
    let mut buf = vec![0u8; len];
    let n = recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())
        .map_err(|source| CriuError::Socket { source })?;
    rpc::Criu_resp::parse_from_bytes(&buf[..n]).map_err(|source| CriuError::Protobuf { source })
}

/// Options every request that touches images starts from.
pub(crate) fn base_opts(images_dir: &Path, log_file: &str, log_level: i32) -> rpc::Criu_opts {
    let mut opts = rpc::Criu_opts::new();
    opts.set_images_dir_fd(-1);
    opts.set_images_dir(path_string(images_dir));
    opts.set_log_file(log_file.to_owned());
    opts.set_log_level(log_level);
    opts
}

pub(crate) fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Where CRIU's log for `log_file` ends up (the work dir defaults to the images dir).
pub(crate) fn log_path(images_dir: &Path, log_file: &str) -> PathBuf {
    images_dir.join(log_file)
}
