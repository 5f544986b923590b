//! Reliability and abuse: the real `registry` and `peer --json` binaries on
//! 127.0.0.1, fed hostile bytes, floods, slow readers and odd closes.
//!
//! Every bad-input case checks the same four things: the offending
//! connection is closed (after an `error` frame with the documented code
//! where PROTOCOL.md promises one), the process is still alive, a control
//! client registered before the attack keeps its registration and sees every
//! update in order, and the registry's descriptors and resident memory come
//! back near their baseline once the connections are gone.
//!
//! Every connection is a Noise session: hostile frames travel inside one
//! (so they still reach the frame and CBOR checks and earn the same codes),
//! and hostile bytes where the Noise messages belong close the connection
//! without a word, since there is no session to carry one.
//!
//! Limits are small (heartbeat 200 ms, handshake 2-3 s where a test waits for
//! it) and every loop is bounded in count and in time. Tests that open
//! hundreds of sockets take the `HEAVY` lock, so that they do not disturb
//! each other's timings on a two-core machine. Time bounds leave room for a
//! busy machine: what they catch is a deadline missed by seconds or a
//! connection kept forever, not a slow turn.
//!
//! One test binary. Its own harness (the registry's health, bytes built by
//! hand, reading a connection to its end, the control client, one case, many
//! connections, a background crowd) sits beside the cases, one module per
//! group of the plan they follow; what other tests share is in the testkit.

mod case;
mod churn;
mod closes;
mod control;
mod crowd;
mod ending;
mod floods;
mod herd;
mod hostile_bytes;
mod peer_link;
mod split_frames;
mod system;
mod wire;
