//! Scenarios in the simulated world (`peerchat_testkit::world`): the real
//! registry and peer machines, real framing, CBOR and Noise, simulated time
//! and faults. Each runs in well under a second.

mod liar;
mod random;
mod registrar;
mod registry;
mod relay;
mod scenarios;
mod town;
