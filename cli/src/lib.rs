//! The peer: [`peer`] is its sans-IO logic, [`command`] reads what the user
//! types, [`human`] writes what a person reads in line mode, [`tui`] is the full-screen UI. The `peer` binary puts them on the core event loop.

pub mod args;
pub mod command;
pub mod disk;
pub mod human;
pub mod journal;
pub mod peer;
pub mod store;
pub mod trust;
pub mod tui;
