//! Checkpoints of the notebook kernel with CRIU.
//!
//! - [`Criu`] drives CRIU 4.2+ through its RPC interface (`criu swrk`, with the
//!   protobuf types of `rust-criu`): [`Criu::probe`], [`Criu::dump`],
//!   [`Criu::restore`] (optionally lazy), and [`kill_tree`] to free a tree's pids
//!   before restoring it.
//! - [`store`] keeps checkpoints on disk keyed by notebook, cell, code hash and
//!   predecessor, under a byte budget, with memory images deduplicated through the
//!   content-addressed chunk store of [`chunks`]: [`store::Store::record`] stores a
//!   dump, [`store::Store::images`] gives back a restorable images directory.
//!
//! # Parentage after restore
//!
//! By default the restore asks CRIU for `rst_sibling`: `criu swrk` creates the
//! restored root with `CLONE_PARENT`, so the root becomes a child of the process that
//! called [`Criu::restore`] (the worker's parent), and its pid is
//! [`RestoreStats::pid`]. The caller can and must `waitpid` it. Without it
//! ([`RestoreOptions::as_child`] false) the root is the worker's child and is
//! re-parented to the nearest subreaper (or init) when the worker exits.

#![forbid(unsafe_code)]

pub mod chunks;
mod criu;
mod error;
mod process;
pub mod store;
mod swrk;

pub use criu::{
    Criu, CriuConfig, DEFAULT_CRIU_BINARY, DUMP_LOG, DUMP_META_FILE, DumpMeta, DumpOptions,
    DumpStats, LAZY_PAGES_LOG, LOG_TAIL_LINES, LazyPages, Probe, RESTORE_LOG, RestoreOptions,
    RestoreStats, RunAs, image_bytes, read_meta,
};
pub use error::{CriuError, CriuLog, CriuVersion, MIN_CRIU_VERSION};
pub use process::{descendants, kill_tree, pid_exists};
