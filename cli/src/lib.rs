//! The peer: [`peer`] is its sans-IO logic, [`command`] reads what the user
//! types. The `peer` binary puts them on the core event loop.

pub mod command;
pub mod peer;
pub mod trust;
