//! `mlschat-ds`: the mlschat delivery service.
//!
//! The DS authenticates clients, orders MLS messages (one commit per epoch, a gap-free sequence
//! number per group), stores ciphertext durably until it is delivered, hands out KeyPackages and
//! fans messages out to the members of a group. It never sees plaintext: what it handles is MLS
//! ciphertext plus the clear header fields MLS exposes (RFC 9420 §6, RFC 9750 §5).
//!
//! # Layout
//! - [`protocol`]: the wire format shared with clients (frames, messages, error codes).
//! - [`store`]: the [`store::Store`] trait and its backends: SQLite (embedded, one node) and
//!   PostgreSQL (several nodes sharing one database), picked by [`store::DatabaseUrl`].
//! - [`server`]: the QUIC accept loop, per-connection handlers and fan-out; [`server::run`] is
//!   the entry point, in the manner of mini-redis.
//! - [`config`]: limits and settings, loadable from TOML.
//! - [`tls`]: certificates and the quinn endpoint configuration.
//! - [`dir_lock`]: one process per data directory (and per client profile).
//! - [`signals`]: whether a signal was ignored at start (`nohup`), for both programs.
//! - [`report`]: how both programs word the error that stops them.

pub mod client;
pub mod config;
pub mod dir_lock;
pub mod protocol;
pub mod report;
pub mod server;
pub mod signals;
pub mod store;
pub mod tls;

pub use server::{LocalServer, run};
