//! What a line typed by the user (or written by a script) means.

/// A user command, ready for the peer logic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Plain text: to every peer online.
    Broadcast(String),
    /// `/msg NAME TEXT`.
    Direct { to: String, text: String },
    /// `/peers`.
    Peers,
    /// `/whois NAME`: a peer's key fingerprint.
    Whois(String),
    /// `/status`: the registry session, and when it is tried again.
    Status,
    /// `/history [NAME] [N]`: the last N messages of everyone's
    /// conversation, or of the direct one with NAME.
    History { with: Option<String>, limit: usize },
    /// `/search TEXT`: messages that contain the words.
    Search { text: String, limit: usize },
    /// `/outbox`: what waits for an acknowledgement.
    Outbox,
    /// `/send NAME PATH`: offer a file.
    SendFile { to: String, path: String },
    /// `/accept N [DIR]`: take the file offered as transfer N, into DIR
    /// or the downloads directory.
    Accept { transfer: u64, dir: Option<String> },
    /// `/reject N`: refuse the file offered as transfer N.
    Reject(u64),
    /// `/cancel N`: stop transfer N, either way.
    Cancel(u64),
    /// `/quit`, or the end of input.
    Quit,
}

/// `/history` and `/search` show this many messages unless told.
pub const HISTORY_DEFAULT: usize = 20;
/// The most they show.
pub const HISTORY_MAX: usize = 1000;

/// A line that is not a command, with the code `--json` reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandError {
    pub code: &'static str,
    pub message: String,
}

pub const HELP: &str = "commands: TEXT (to everyone), /msg NAME TEXT, /me TEXT, /peers, /whois NAME, /status, /history [NAME] [N], /search TEXT, /outbox, /send NAME PATH, /accept N [DIR], /reject N, /cancel N, /quit; start a line with // to send one beginning with /";

/// Parses one input line. Blank lines mean nothing (`Ok(None)`).
pub fn parse(line: &str) -> Result<Option<Command>, CommandError> {
    let line = line.strip_suffix('\r').unwrap_or(line);
    if line.trim().is_empty() {
        return Ok(None);
    }
    if let Some(escaped) = line.strip_prefix("//") {
        return Ok(Some(Command::Broadcast(format!("/{escaped}"))));
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Some(Command::Broadcast(line.to_string())));
    };
    let (word, args) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    match word {
        "msg" => {
            let args = args.trim_start();
            let (to, text) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            let text = text.trim_start();
            if to.is_empty() || text.is_empty() {
                return Err(CommandError {
                    code: "bad_command",
                    message: "usage: /msg NAME TEXT".into(),
                });
            }
            Ok(Some(Command::Direct {
                to: to.to_string(),
                text: text.to_string(),
            }))
        }
        // An action: sent as text that starts with `/me `, which the UIs
        // show as `* name TEXT`.
        "me" => match args.trim() {
            "" => Err(CommandError {
                code: "bad_command",
                message: "usage: /me TEXT".into(),
            }),
            _ => Ok(Some(Command::Broadcast(line.to_string()))),
        },
        "peers" => Ok(Some(Command::Peers)),
        "status" => Ok(Some(Command::Status)),
        "whois" => match args.split_whitespace().collect::<Vec<_>>()[..] {
            [name] => Ok(Some(Command::Whois(name.to_string()))),
            _ => Err(CommandError {
                code: "bad_command",
                message: "usage: /whois NAME".into(),
            }),
        },
        "history" => parse_history(args).map(Some),
        "search" => match args.trim() {
            "" => Err(CommandError {
                code: "bad_command",
                message: "usage: /search TEXT".into(),
            }),
            text => Ok(Some(Command::Search {
                text: text.to_string(),
                limit: HISTORY_DEFAULT,
            })),
        },
        "outbox" => Ok(Some(Command::Outbox)),
        "send" => {
            let args = args.trim();
            let (to, path) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            let path = unquote(path.trim());
            if to.is_empty() || path.is_empty() {
                return Err(bad_command("usage: /send NAME PATH"));
            }
            Ok(Some(Command::SendFile {
                to: to.to_string(),
                path: path.to_string(),
            }))
        }
        "accept" => {
            let usage = || bad_command("usage: /accept N [DIR], N the transfer's number");
            let args = args.trim();
            let (number, dir) = args.split_once(char::is_whitespace).unwrap_or((args, ""));
            let transfer = number.parse().map_err(|_| usage())?;
            let dir = Some(unquote(dir.trim()))
                .filter(|d| !d.is_empty())
                .map(str::to_string);
            Ok(Some(Command::Accept { transfer, dir }))
        }
        "reject" | "cancel" => match args.trim().parse() {
            Ok(n) if word == "reject" => Ok(Some(Command::Reject(n))),
            Ok(n) => Ok(Some(Command::Cancel(n))),
            Err(_) => Err(bad_command(&format!(
                "usage: /{word} N, N the transfer's number"
            ))),
        },
        "quit" => Ok(Some(Command::Quit)),
        _ => Err(CommandError {
            code: "unknown_command",
            message: format!("unknown command /{word}; {HELP}"),
        }),
    }
}

/// A path as typed, without the quotes a shell would want around one with
/// spaces (which paths here need not have: the path is the rest of the
/// line).
fn unquote(path: &str) -> &str {
    ['"', '\'']
        .iter()
        .find_map(|q| path.strip_prefix(*q)?.strip_suffix(*q))
        .filter(|inner| !inner.is_empty())
        .unwrap_or(path)
}

fn bad_command(message: &str) -> CommandError {
    CommandError {
        code: "bad_command",
        message: message.into(),
    }
}

/// `/history`, `/history N`, `/history NAME` or `/history NAME N`.
fn parse_history(args: &str) -> Result<Command, CommandError> {
    let usage = || CommandError {
        code: "bad_command",
        message: format!("usage: /history [NAME] [N], N from 1 to {HISTORY_MAX}"),
    };
    let count = |word: &str| match word.parse::<usize>() {
        Ok(n) if (1..=HISTORY_MAX).contains(&n) => Ok(n),
        _ => Err(usage()),
    };
    let (with, limit) = match args.split_whitespace().collect::<Vec<_>>()[..] {
        [] => (None, HISTORY_DEFAULT),
        [word] if word.bytes().all(|b| b.is_ascii_digit()) => (None, count(word)?),
        [name] => (Some(name.to_string()), HISTORY_DEFAULT),
        [name, n] => (Some(name.to_string()), count(n)?),
        _ => return Err(usage()),
    };
    Ok(Command::History { with, limit })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_mean_what_the_readme_says() {
        assert_eq!(
            parse("hello all"),
            Ok(Some(Command::Broadcast("hello all".into())))
        );
        assert_eq!(parse("  "), Ok(None));
        assert_eq!(
            parse("/msg bob  hi there "),
            Ok(Some(Command::Direct {
                to: "bob".into(),
                text: "hi there ".into()
            }))
        );
        assert_eq!(
            parse("/msg 张伟 你好"),
            Ok(Some(Command::Direct {
                to: "张伟".into(),
                text: "你好".into()
            }))
        );
        assert_eq!(parse("/peers"), Ok(Some(Command::Peers)));
        assert_eq!(
            parse("/me waves"),
            Ok(Some(Command::Broadcast("/me waves".into())))
        );
        assert_eq!(parse("/me  ").unwrap_err().code, "bad_command");
        assert_eq!(parse("/status"), Ok(Some(Command::Status)));
        assert_eq!(
            parse("/whois  Bob "),
            Ok(Some(Command::Whois("Bob".into())))
        );
        assert_eq!(parse("/whois").unwrap_err().code, "bad_command");
        assert_eq!(parse("/whois a b").unwrap_err().code, "bad_command");
        assert_eq!(parse("/quit\r"), Ok(Some(Command::Quit)));
        assert_eq!(
            parse("//shrug"),
            Ok(Some(Command::Broadcast("/shrug".into())))
        );
        assert_eq!(parse("/msg bob").unwrap_err().code, "bad_command");
        assert_eq!(
            parse("/send bob  ~/My Files/a b.txt "),
            Ok(Some(Command::SendFile {
                to: "bob".into(),
                path: "~/My Files/a b.txt".into()
            }))
        );
        assert_eq!(parse("/send bob").unwrap_err().code, "bad_command");
        assert_eq!(
            parse("/send bob '/tmp/a b.txt'"),
            Ok(Some(Command::SendFile {
                to: "bob".into(),
                path: "/tmp/a b.txt".into()
            }))
        );
        assert_eq!(
            parse("/accept 1 \"/tmp/in box\""),
            Ok(Some(Command::Accept {
                transfer: 1,
                dir: Some("/tmp/in box".into())
            }))
        );
        assert_eq!(
            parse("/accept 3"),
            Ok(Some(Command::Accept {
                transfer: 3,
                dir: None
            }))
        );
        assert_eq!(
            parse("/accept 3 /tmp/in box"),
            Ok(Some(Command::Accept {
                transfer: 3,
                dir: Some("/tmp/in box".into())
            }))
        );
        assert_eq!(parse("/accept x").unwrap_err().code, "bad_command");
        assert_eq!(parse("/reject 4"), Ok(Some(Command::Reject(4))));
        assert_eq!(parse("/cancel 5"), Ok(Some(Command::Cancel(5))));
        assert_eq!(parse("/cancel").unwrap_err().code, "bad_command");
        assert_eq!(parse("/dance").unwrap_err().code, "unknown_command");
    }
}
