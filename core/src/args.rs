//! What both binaries' command lines share (behind the `cli` feature, so
//! the core library itself does not pull in clap).

use std::time::Duration;

use clap::Parser;

/// A duration flag's value (`200ms`, `5s`, `7days`): longer than zero.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be longer than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(format!("{e} (write durations like 200ms, 5s or 1m)")),
    }
}

/// A size flag's value (`4GiB`, `500MB`, `1048576`), in bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    s.parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|e| format!("{s:?} is not a size ({e}); write it like 4GiB or 500MB"))
}

/// Parses the command line. On a bad one, prints clap's error with the
/// usage line (clap omits it for some errors, such as an invalid value) in
/// clap's own place, before the pointer to `--help`, and exits with status 2.
pub fn parse_args<P: Parser>() -> P {
    P::try_parse().unwrap_or_else(|e| {
        let text = e.render().to_string();
        if !e.use_stderr() || text.contains("Usage:") {
            e.exit();
        }
        eprint!(
            "{}",
            with_usage(&text, &P::command().render_usage().to_string())
        );
        std::process::exit(2);
    })
}

/// Puts `usage` into an error text that lacks it, where clap puts it.
fn with_usage(error: &str, usage: &str) -> String {
    const MORE: &str = "For more information, try";
    let error = error.trim_end();
    match error.find(MORE) {
        Some(at) => format!(
            "{}\n\n{usage}\n\n{}\n",
            error[..at].trim_end(),
            &error[at..]
        ),
        None => format!("{error}\n\n{usage}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_usage_line_goes_before_the_pointer_to_help() {
        let error = "error: invalid value '5' for '--stats-interval <DUR>': no unit\n\nFor more information, try '--help'.\n";
        assert_eq!(
            with_usage(error, "Usage: registry --listen <ADDR>"),
            "error: invalid value '5' for '--stats-interval <DUR>': no unit\n\nUsage: registry --listen <ADDR>\n\nFor more information, try '--help'.\n"
        );
        assert_eq!(
            with_usage("error: x\n", "Usage: y"),
            "error: x\n\nUsage: y\n"
        );
    }
}
