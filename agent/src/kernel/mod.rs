//! The Jupyter kernel: finding its kernelspec, launching it confined, and talking to it.
pub mod client;
pub mod init;
pub mod launch;
pub mod spec;
pub mod sys;
