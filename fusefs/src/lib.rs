//! The attached-files filesystem of the notebook agent.
//!
//! - [`core`]: the pure filesystem core ([`Fs`]): inodes, TTL caches, path safety,
//!   write-back staging. Unit- and property-tested without mounting anything.
//! - [`backing`]: where files come from ([`Backing`]): a local directory ([`LocalDir`]) or
//!   the agent's channel to the server ([`ChannelBacking`]).
//! - [`cache`]: fetched content kept in a bounded local directory, with read-ahead.
//! - [`fuse`]: the thin `fuser` adapter and the mount helpers ([`mount`], [`Mounted`]).
//! - [`copy`]: the fallback without FUSE: copy a tree into a directory and sync it back.
#![forbid(unsafe_code)]

pub mod backing;
pub mod cache;
pub mod copy;
pub mod core;
pub mod error;
pub mod fuse;
pub mod path;
mod poll;

pub use backing::{
    Backing, BackingRequest, ChannelBacking, Listing, LocalDir, Ticket, upload_now,
    validate_listing,
};
pub use core::{Attr, Clock, Fs, FsConfig, ManualClock, OpenMode, Opened, ROOT_INO, SystemClock};
pub use error::{BackingError, FsError, ListingError, PathError};
pub use fuse::{MountOptions, Mounted, detach_stale, mount};
