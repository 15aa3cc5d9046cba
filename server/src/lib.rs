//! `nbserver`: the reference server for nbagent.
pub mod blobs;
pub mod pki;
pub mod store;
