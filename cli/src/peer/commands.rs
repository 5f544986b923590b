//! The user's commands: what each asks of the rooms, and whom a name
//! given on the command line means.

use std::time::{Instant, SystemTime};

use peerchat_core::protocol::{fold_name, normalize_name, ErrorCode};

use super::{outbox, unix_ms, Code, Event, HostOutput, Peer};
use crate::command::Command;
use crate::journal::{Party, Query};

/// `/outbox` lists at most this many messages.
const OUTBOX_LISTED: usize = 1000;

impl Peer {
    /// Runs a user command; `wall` is the wall-clock time, which chat
    /// messages carry for their readers. Returns the id a chat was given,
    /// if it was accepted.
    pub fn command(&mut self, command: Command, now: Instant, wall: SystemTime) -> Option<u64> {
        self.actions.now = now;
        if self.quitting() {
            return None;
        }
        let sent_at = unix_ms(wall);
        match command {
            Command::Broadcast(text) => {
                let chat = outbox::Draft {
                    text,
                    direct: false,
                    sent_at,
                };
                let targets = self.directory.targets();
                return self
                    .outbox
                    .send(targets, chat, now, &self.directory, &mut self.actions);
            }
            Command::Direct { to, .. } if self.directory.is_me(&fold_name(&to)) => {
                self.actions.error(
                    Code::BadCommand,
                    "you cannot message yourself; /msg is for another peer".into(),
                );
            }
            Command::Direct { to, text } => {
                let Some(target) = self.target(&to) else {
                    self.actions.error(
                        ErrorCode::UnknownPeer,
                        format!("no peer named {to:?} is online or was met before (see /peers)"),
                    );
                    return None;
                };
                let chat = outbox::Draft {
                    text,
                    direct: true,
                    sent_at,
                };
                return self.outbox.send(
                    vec![target.as_to()],
                    chat,
                    now,
                    &self.directory,
                    &mut self.actions,
                );
            }
            Command::History { with, limit } => {
                let with = match with {
                    None => None,
                    Some(name) => match self.target(&name) {
                        Some(target) => Some(target.party),
                        None => {
                            self.actions.error(
                                ErrorCode::UnknownPeer,
                                format!("no peer named {name:?} is online or was met before"),
                            );
                            return None;
                        }
                    },
                };
                let query = Query::History { with, limit };
                self.actions.host(HostOutput::Query(query));
            }
            Command::Search { text, limit } => {
                self.actions
                    .host(HostOutput::Query(Query::Search { text, limit }));
            }
            Command::Outbox => {
                let messages = self.outbox.list(&self.directory, OUTBOX_LISTED);
                self.actions.emit(Event::Outbox { messages });
            }
            Command::Peers => {
                let peers = self.peers();
                self.actions.emit(Event::Peers { peers });
            }
            Command::Whois(name) => self.whois(&name),
            Command::Status => {
                let status = self.session.status(now, self.directory.len());
                self.actions.emit(status);
            }
            Command::SendFile { to, path } => match self.target(&to) {
                Some(target) if target.listed => {
                    self.transfers
                        .send(target, path.into(), &mut self.rng, &mut self.actions);
                }
                _ => self.actions.error(
                    ErrorCode::UnknownPeer,
                    format!("no peer named {to:?} is online (see /peers)"),
                ),
            },
            Command::Accept { transfer, dir } => {
                self.transfers
                    .accept(transfer, dir.map(Into::into), &mut self.actions);
            }
            Command::Reject(transfer) => self.transfers.reject(transfer, &mut self.actions),
            Command::Cancel(transfer) => self.transfers.cancel(transfer, &mut self.actions),
            Command::Quit => self.quit(now),
        }
        None
    }

    /// Whom `name` means: the peer online under it, else the key pinned
    /// for it (someone met before, who may be away now).
    fn target(&self, name: &str) -> Option<outbox::Target> {
        let folded = fold_name(name.trim());
        if self.directory.is_me(&folded) {
            return None;
        }
        if let Some(known) = self.directory.get(&folded) {
            return Some(outbox::Target {
                party: Party {
                    key: known.key,
                    name: known.name.clone(),
                },
                folded,
                listed: true,
                mismatch: known.mismatch,
            });
        }
        let key = self.directory.pinned(&folded)?;
        let name = normalize_name(name).ok()?;
        Some(outbox::Target {
            folded,
            party: Party { key, name },
            listed: false,
            mismatch: false,
        })
    }

    fn whois(&mut self, name: &str) {
        let folded = fold_name(name.trim());
        let found = if self.directory.is_me(&folded) {
            Some(Event::Whois {
                name: self.session.name().to_string(),
                key: self.key,
                pinned: true,
                you: true,
                pinned_key: None,
                link: None,
            })
        } else {
            self.directory.get(&folded).map(|known| {
                let pin = self.directory.pinned(&folded);
                Event::Whois {
                    name: known.name.clone(),
                    key: known.key,
                    pinned: pin == Some(known.key),
                    you: false,
                    pinned_key: pin.filter(|p| *p != known.key),
                    link: self.outbox.path_to(&folded).map(|p| p.as_str().into()),
                }
            })
        };
        match found {
            Some(event) => self.actions.emit(event),
            None => self.actions.error(
                ErrorCode::UnknownPeer,
                format!("no peer named {name:?} is online (see /peers)"),
            ),
        }
    }
}
