//! What both binaries' command lines share (behind the `cli` feature, so
//! the core library itself does not pull in clap).

use clap::Parser;

/// Parses the command line. On a bad one, prints clap's error followed by
/// the usage line (clap omits it for some errors, such as an invalid value)
/// and exits with status 2.
pub fn parse_args<P: Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| {
        let text = e.render().to_string();
        if !e.use_stderr() || text.contains("Usage:") {
            e.exit();
        }
        eprintln!("{}\n{}", text.trim_end(), P::command().render_usage());
        std::process::exit(2);
    })
}
