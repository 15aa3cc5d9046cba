//! `nbserver demo`, the main job: a server with embedded defaults, a local agent under
//! `nbsupervisor` that enrols with a single-use token and runs a real Jupyter kernel,
//! a sample notebook run through it (reading an attached CSV from the notebook's files and
//! writing a summary back), and what the server stored.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use nbagent_protocol::{Envelope, Feature, FileRoot, Message};

use crate::cli::{Cli, DemoArgs, create_token, print_summary};
use crate::config::ServerConfig;
use crate::notebook::Notebook;
use crate::run::{self, CellResult};

/// The agent the demo enrols.
const AGENT: &str = "demo-agent";

fn sibling(name: &str, given: &Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let p = match given {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join(name))
            .with_context(|| format!("cannot locate {name} next to nbserver"))?,
    };
    if !p.exists() {
        bail!(
            "{name} binary not found at {}: build it (cargo build) or pass --{name}-bin",
            p.display()
        );
    }
    Ok(p)
}

fn print_cell(i: usize, r: &CellResult) {
    println!(
        "-- cell {i} [{}]  {:?}  In[{}]  {} ms",
        r.cell,
        r.status,
        r.execution_count
            .map(|c| c.to_string())
            .unwrap_or_else(|| " ".into()),
        r.duration_ms
    );
    for o in &r.outputs {
        for line in run::render_output(o).lines() {
            println!("   | {line}");
        }
    }
}

async fn print_features(state: &crate::state::ServerState) -> anyhow::Result<()> {
    let msgs = state.store.messages_of_kind(AGENT, "capabilities").await?;
    let Some(last) = msgs.last() else {
        println!("   (the agent sent no capability report)");
        return Ok(());
    };
    let env: Envelope = serde_json::from_str(&last.header)?;
    if let Message::Capabilities { features } = env.msg {
        for Feature {
            name,
            enabled,
            detail,
            how_to_enable,
        } in features
        {
            let mark = if enabled { "on " } else { "off" };
            println!("   {mark} {name:<20} {detail}");
            if !enabled && !how_to_enable.is_empty() {
                println!("       to enable: {how_to_enable}");
            }
        }
    }
    Ok(())
}

/// Reactive mode: edit a late cell and re-run from it (the agent restores the
/// checkpoint taken after the cell before it), then re-run the same edited notebook
/// from the top, and compare.
async fn reactive_demo(
    state: &crate::state::ServerState,
    notebook: &Notebook,
    timeout_secs: u64,
) -> anyhow::Result<()> {
    let checkpoints = state.store.messages_of_kind(AGENT, "checkpoint").await?;
    let created = checkpoints
        .iter()
        .filter(|m| m.header.contains("\"created\""))
        .count();
    println!("== reactive mode: {created} checkpoints taken after the cells above");
    let Some(edit) = notebook.cells.len().checked_sub(2) else {
        return Ok(());
    };
    let mut edited = notebook.cells.clone();
    edited[edit].code.push_str("\nprint(\"(edited)\")");
    println!(
        "== editing cell {edit} [{}] and re-running from it",
        edited[edit].id
    );
    let timeout = Duration::from_secs(timeout_secs);
    let t = Instant::now();
    let rewound = run::run_from(state, AGENT, "reactive-1", &edited, edit, timeout).await?;
    let rewind = t.elapsed();
    for r in &rewound {
        let i = r.request.rsplit('/').next().unwrap_or("?");
        print_cell(i.parse().unwrap_or(0), r);
    }
    let t = Instant::now();
    let from_top = run::run_from(state, AGENT, "reactive-top", &edited, 0, timeout).await?;
    let top = t.elapsed();
    println!(
        "== re-run from cell {edit}: {:.2}s for {} cells (restore + re-run); from the top: \
         {:.2}s for {} cells (fresh kernel + re-run); {:.1}x faster",
        rewind.as_secs_f64(),
        rewound.len(),
        top.as_secs_f64(),
        from_top.len(),
        top.as_secs_f64() / rewind.as_secs_f64().max(1e-6)
    );
    let same = rewound
        .iter()
        .zip(from_top.iter().skip(edit))
        .all(|(a, b)| a.outputs == b.outputs && a.status == b.status);
    println!(
        "== the re-run cells' outputs {} those of the run from the top",
        if same { "equal" } else { "DIFFER FROM" }
    );
    Ok(())
}

/// Runs the demo.
pub async fn demo(cli: &Cli, a: &DemoArgs) -> anyhow::Result<ExitCode> {
    let agent_bin = sibling("nbagent", &a.agent_bin)?;
    let supervisor_bin = sibling("nbsupervisor", &a.supervisor_bin)?;
    let notebook = Notebook::read(&a.notebook)?;
    let data_dir = cli.data_dir.join("demo-server");
    let agent_dir = cli.data_dir.join("demo-agent");
    let run_dir = cli.data_dir.join("demo-run");
    for d in [
        &data_dir,
        &agent_dir,
        &run_dir,
        &cli.data_dir.join("demo-runtime"),
    ] {
        if d.exists() {
            std::fs::remove_dir_all(d).with_context(|| format!("cannot clear {}", d.display()))?;
        }
    }
    let mut config = ServerConfig::new(data_dir.clone(), "127.0.0.1:0".parse()?);
    config.database_url = cli.database_url.clone();
    let server = crate::start(config)
        .await
        .context("cannot start the server")?;
    let token = create_token(&server.state.store, AGENT, Duration::from_secs(600)).await?;
    println!(
        "== nbserver listening on {} (data in {})",
        server.addr,
        data_dir.display()
    );
    println!("== enrolment token created for agent '{AGENT}' (single use, 10 min)");
    let sales = a
        .notebook
        .parent()
        .unwrap_or(Path::new("."))
        .join("sales.csv");
    if sales.exists() {
        let put = crate::files::put_path(
            &server.state.store,
            &server.state.blobs,
            AGENT,
            FileRoot::Notebook,
            &sales,
            Some("sales.csv"),
        )
        .await
        .with_context(|| format!("cannot attach {}", sales.display()))?;
        for f in put {
            println!(
                "== attached {} as notebook file {} ({} bytes): the kernel sees /data/notebook_files/{}",
                sales.display(),
                f.path,
                f.size,
                f.path
            );
        }
    }
    println!(
        "== starting nbsupervisor -> nbagent (kernel {} as user {})",
        notebook.kernel, a.kernel_user
    );
    let started = Instant::now();
    let mut supervisor = tokio::process::Command::new(&supervisor_bin)
        .arg("--run-dir")
        .arg(&run_dir)
        .arg("--shutdown-deadline-secs")
        .arg("20")
        .arg("--")
        .arg(&agent_bin)
        .arg("--server")
        .arg(server.addr.to_string())
        .arg("--state-dir")
        .arg(&agent_dir)
        .arg("--server-ca")
        .arg(data_dir.join("pki").join("ca.crt"))
        .arg("--kernel")
        .arg(&notebook.kernel)
        .env("NBAGENT_TOKEN", token.to_string())
        .env("KERNEL_USERNAME", &a.kernel_user)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .env("NBAGENT_RUNTIME_DIR", cli.data_dir.join("demo-runtime"))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", supervisor_bin.display()))?;

    println!(
        "== running {} ({} code cells)",
        a.notebook.display(),
        notebook.cells.len()
    );
    let mut index = 0;
    let results = run::run_cells(
        &server.state,
        AGENT,
        "demo",
        &notebook.cells,
        Duration::from_secs(a.timeout_secs),
        |r| {
            print_cell(index, r);
            index += 1;
        },
    )
    .await;
    let elapsed = started.elapsed();
    let results = match results {
        Ok(r) => r,
        Err(e) => {
            let _ = supervisor.kill().await;
            print_summary(&server.state.store, &data_dir, 10).await?;
            return Err(e).context("the notebook did not finish");
        }
    };
    println!(
        "== notebook finished in {:.2}s (agent start, kernel start and all cells)",
        elapsed.as_secs_f64()
    );
    reactive_demo(&server.state, &notebook, a.timeout_secs).await?;

    println!("== what the agent can do here (its capability report):");
    print_features(&server.state).await?;

    println!("== asking the agent to shut down");
    server
        .state
        .submit(
            AGENT,
            &Message::Shutdown {
                reason: "demo finished".into(),
                deadline_ms: 10_000,
            },
        )
        .await?;
    let status = tokio::time::timeout(Duration::from_secs(30), supervisor.wait())
        .await
        .context("nbsupervisor did not exit within 30 s of the shutdown")??;
    println!("== nbsupervisor exited: {status}");

    println!("== the server stored:");
    print_summary(&server.state.store, &data_dir, 3).await?;
    println!("== attached files on the server:");
    crate::cli::print_files(&server.state.store, Some(AGENT)).await?;
    match crate::files::read(
        &server.state.store,
        &server.state.blobs,
        AGENT,
        FileRoot::Notebook,
        "summary.csv",
    )
    .await?
    {
        Some(bytes) => {
            println!("== summary.csv as the kernel saved it (read back from the server):");
            for line in String::from_utf8_lossy(&bytes).lines() {
                println!("   | {line}");
            }
        }
        None => println!("== the kernel saved no summary.csv (see the notebook's output above)"),
    }
    let blobs = server.state.store.blob_count().await?;
    println!(
        "== blobs verified and stored: {blobs} (in {})",
        data_dir.join("blobs").display()
    );
    server.shutdown().await;
    let errors = results
        .iter()
        .filter(|r| r.status != nbagent_protocol::CellStatus::Ok)
        .count();
    println!(
        "== {} cells ran, {errors} ended with an error (the sample's last cell fails on purpose)",
        results.len()
    );
    Ok(if status.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The sample notebook shipped in `examples/`, relative to the working directory.
pub fn default_notebook() -> PathBuf {
    Path::new("examples").join("sample.ipynb")
}
