//! The root package only owns the end-to-end tests and benches.
