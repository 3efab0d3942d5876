//! `mlschat`: an end-to-end encrypted group chat for the terminal, built on MLS (RFC 9420).
//!
//! # Layout
//! - [`core`]: the only place openmls is called. One thread owns the profile database, the
//!   signer and every group; commands go in, events come out.
//! - [`net`]: the only place quinn is called: connection to the DS, certificate pinning,
//!   reconnects.
//! - [`client`]: wiring: picks (or hosts) a DS, starts the core and the network.
//! - [`headless`]: the `--headless` mode, commands on stdin and JSON events on stdout.
//! - [`cli`]: command-line flags shared by the TUI and the headless mode.
//! - [`signals`]: SIGTERM, SIGINT and SIGHUP, which both front ends answer as `/quit`.

pub mod app;
pub mod cli;
pub mod client;
pub mod commands;
pub mod config;
pub mod core;
pub mod headless;
pub mod net;
pub mod signals;
pub mod tui;
pub mod ui;
