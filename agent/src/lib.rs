//! `nbagent`: the in-container notebook agent.
pub mod identity;
pub mod outbox;
