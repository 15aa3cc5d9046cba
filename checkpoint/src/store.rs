//! Checkpoint store.
