//! `nbserver`: the reference server for nbagent.
//!
//! - [`server`]: the agent listener (TLS or legacy plaintext on one port).
//! - [`conn`]: one agent connection: enrolment, authentication, exactly-once storage.
//! - [`pki`]: the certificate authority, server certificate and enrolment tokens.
//! - [`store`]: the database (SQLite embedded by default, PostgreSQL by URL).
//! - [`blobs`]: the content-addressed blob store.
//! - [`files`]: the attached files of each agent (listing, reads, uploads, conflicts).
//! - [`run`]: running notebook cells on an agent and reading back their outputs.
//! - [`cli`]: the `nbserver` command line, including the `demo` main job.
#![forbid(unsafe_code)]

pub mod blobs;
pub mod cli;
pub mod config;
pub mod conn;
pub mod demo;
pub mod files;
pub mod notebook;
pub mod pki;
pub mod run;
pub mod server;
pub mod state;
pub mod store;

pub use config::ServerConfig;
pub use server::{RunningServer, start};
