//! Receiving files: offers to us (shown, refused or taken at once), the
//! chunks that go to the disk, and the answers on the link they came on.

use super::*;
use crate::peer::Code;
use std::path::Path;

impl Transfers {
    fn shown_in(number: u64, inc: &Incoming) -> Shown {
        Shown {
            number,
            direction: Direction::In,
            peer: inc.from.clone(),
            name: inc.name.clone(),
            size: inc.size,
        }
    }

    /// A file message from `from` (listed under `key`) on link `conn`, which
    /// the inbox verified.
    pub(in crate::peer) fn on_incoming(
        &mut self,
        conn: LinkId,
        party: Party,
        msg: LinkMsg,
        actions: &mut Actions,
    ) -> Result<(), String> {
        match msg {
            LinkMsg::FileOffer {
                id,
                name,
                size,
                sha256,
            } => {
                self.on_offer(conn, party, id, name, size, sha256, actions);
                Ok(())
            }
            LinkMsg::FileChunk { id, offset, data } => {
                self.on_chunk(conn, party.key, id, offset, data, actions)
            }
            LinkMsg::FileCancel { id, code, reason } => {
                if let Some(number) = self.by_id.get(&(party.key, id)).copied() {
                    let reason = format!("{}: {reason}", party.name);
                    self.end_in(number, FileCode::parse(&code), reason, false, actions);
                }
                Ok(())
            }
            _ => Err("the acceptor's file messages come only from it".into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_offer(
        &mut self,
        conn: LinkId,
        party: Party,
        id: u64,
        offered: String,
        size: u64,
        sha256: [u8; 32],
        actions: &mut Actions,
    ) {
        let key = (party.key, id);
        if let Some(outcome) = self.ended.get(&key) {
            let frame = match outcome {
                None => protocol::frame(&LinkMsg::FileDone { id }),
                Some(code) => cancel_frame(id, *code, "the transfer has ended"),
            };
            actions.send(conn, frame);
            return;
        }
        if let Some(number) = self.by_id.get(&key).copied() {
            let Some(inc) = self.incoming.get_mut(&number) else {
                return;
            };
            inc.conn = Some(conn);
            if inc.size != size || inc.sha256 != sha256 {
                let why = "offered again as another file".to_string();
                self.end_in(number, FileCode::Protocol, why, true, actions);
            } else if matches!(inc.phase, InPhase::Resuming) {
                inc.phase = InPhase::Offered;
                let dir = inc.dir.clone();
                self.accept(number, dir, actions);
            } else if let InPhase::Receiving { received, .. } = inc.phase {
                // The sender resumes over a new link.
                inc.progress.restart(actions.now, received);
                let frame = protocol::frame(&LinkMsg::FileAccept {
                    id,
                    offset: received,
                });
                actions.send(conn, frame);
            }
            return;
        }
        let name = safe_file_name(&offered);
        let refuse = if size > self.config.max_file_size {
            Some((
                FileCode::TooLarge,
                format!(
                    "{} is {size} bytes; this peer takes files of at most {} (--max-file-size)",
                    name, self.config.max_file_size
                ),
            ))
        } else if self.incoming.len() >= MAX_INCOMING
            || self
                .incoming
                .values()
                .filter(|i| i.key == party.key)
                .count()
                >= MAX_OFFERS_PER_SENDER
        {
            Some((
                FileCode::Busy,
                "too many transfers at once; try later".into(),
            ))
        } else {
            None
        };
        if let Some((code, reason)) = refuse {
            tracing::info!(from = %party.name, %name, %reason, "refusing a file offer");
            actions.send(conn, cancel_frame(id, code, reason.clone()));
            let number = self.number();
            let shown = Shown {
                number,
                direction: Direction::In,
                peer: party.name,
                name,
                size,
            };
            actions.emit(failed_event(shown, code, reason));
            self.remember(key, Some(code));
            return;
        }
        let number = self.number();
        let deadline = actions.arm(
            actions.now + self.config.offer_ttl,
            Timer::FileDeadline(number),
        );
        actions.emit(Event::FileOffer {
            transfer: number,
            direction: Direction::In,
            peer: party.name.clone(),
            name: name.clone(),
            size,
            sha256: hex(&sha256),
        });
        let auto = self.config.accept_from.contains(&fold_name(&party.name));
        self.by_id.insert(key, number);
        self.incoming.insert(
            number,
            Incoming {
                id,
                key: party.key,
                from: party.name,
                name,
                dir: None,
                size,
                sha256,
                conn: Some(conn),
                phase: InPhase::Offered,
                deadline: Some(deadline),
                progress: Progress::default(),
            },
        );
        if auto {
            self.accept(number, None, actions);
        }
    }

    fn on_chunk(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        id: u64,
        offset: u64,
        data: Vec<u8>,
        actions: &mut Actions,
    ) -> Result<(), String> {
        let Some(number) = self.by_id.get(&(key, id)).copied() else {
            if !self.ended.contains_key(&(key, id)) {
                actions.send(
                    conn,
                    cancel_frame(id, FileCode::Unknown, "no such transfer"),
                );
            }
            // Else it was in flight when the transfer ended.
            return Ok(());
        };
        let Some(inc) = self.incoming.get_mut(&number) else {
            return Ok(());
        };
        let InPhase::Receiving { received, written } = &mut inc.phase else {
            return Err(format!(
                "file data for transfer {id:x}, which is not accepted"
            ));
        };
        let len = data.len() as u64;
        if offset != *received || len == 0 || len > inc.size - *received {
            return Err(format!(
                "file data at byte {offset} ({len} bytes) where byte {received} of {} was due",
                inc.size
            ));
        }
        if *received + len - *written > WINDOW + CHUNK as u64 {
            return Err(format!(
                "more than {WINDOW} bytes of file data unacknowledged"
            ));
        }
        *received += len;
        actions.host(HostOutput::Disk(DiskOp::Write {
            transfer: number,
            offset,
            data,
        }));
        Ok(())
    }

    /// `/accept N [DIR]`.
    pub(in crate::peer) fn accept(
        &mut self,
        number: u64,
        dir: Option<PathBuf>,
        actions: &mut Actions,
    ) {
        let Some(inc) = self.incoming.get_mut(&number) else {
            return self.not_found(number, "/accept", actions);
        };
        if !matches!(inc.phase, InPhase::Offered) {
            actions.error(
                Code::BadCommand,
                format!("transfer {number} is already accepted"),
            );
            return;
        }
        inc.phase = InPhase::Opening;
        let dir = dir.unwrap_or_else(|| self.config.downloads.clone());
        inc.dir = Some(dir.clone());
        actions.record(Record::Transfer(journal::Transfer {
            id: inc.id,
            outgoing: false,
            peer: Party {
                key: inc.key,
                name: inc.from.clone(),
            },
            path: dir.display().to_string(),
            name: inc.name.clone(),
            size: inc.size,
            sha256: inc.sha256,
        }));
        actions.host(HostOutput::Disk(DiskOp::Receive {
            transfer: number,
            dir,
            name: inc.name.clone(),
            id: inc.id,
            size: inc.size,
            sha256: inc.sha256,
        }));
    }

    pub(super) fn not_found(&self, number: u64, command: &str, actions: &mut Actions) {
        actions.error(
            Code::BadCommand,
            format!("{command}: no transfer {number} is under way"),
        );
    }

    /// `/reject N`.
    pub(in crate::peer) fn reject(&mut self, number: u64, actions: &mut Actions) {
        match self.incoming.get(&number) {
            Some(inc) if matches!(inc.phase, InPhase::Offered) => {
                self.end_in(number, FileCode::Rejected, "rejected".into(), true, actions);
            }
            Some(_) => actions.error(
                Code::BadCommand,
                format!("transfer {number} is accepted; /cancel {number} stops it"),
            ),
            None => self.not_found(number, "/reject", actions),
        }
    }

    /// Ends an incoming transfer: its partial file goes, and the sender is
    /// told if `tell`.
    pub(super) fn end_in(
        &mut self,
        number: u64,
        code: FileCode,
        reason: String,
        tell: bool,
        actions: &mut Actions,
    ) {
        let Some(inc) = self.incoming.remove(&number) else {
            return;
        };
        self.by_id.remove(&(inc.key, inc.id));
        actions.cancel(inc.deadline);
        inc.ended(actions);
        match (&inc.phase, &inc.dir) {
            (InPhase::Offered, _) => {}
            (InPhase::Resuming, Some(dir)) => actions.host(HostOutput::Disk(DiskOp::Discard {
                dir: dir.clone(),
                name: inc.name.clone(),
                id: inc.id,
            })),
            _ => close_file(number, true, actions),
        }
        if let (true, Some(conn)) = (tell, inc.conn) {
            actions.send(conn, cancel_frame(inc.id, code, reason.clone()));
        }
        self.remember((inc.key, inc.id), Some(code));
        actions.emit(failed_event(Self::shown_in(number, &inc), code, reason));
    }

    fn remember(&mut self, key: (PublicKey, u64), outcome: Option<FileCode>) {
        if self.ended.insert(key, outcome).is_none() {
            self.ended_order.push_back(key);
        }
        while self.ended_order.len() > ENDED_REMEMBERED {
            if let Some(old) = self.ended_order.pop_front() {
                self.ended.remove(&old);
            }
        }
    }

    /// A link to us closed: what came on it is answered on the next one.
    pub(in crate::peer) fn on_link_closed(&mut self, conn: LinkId) {
        for inc in self.incoming.values_mut() {
            if inc.conn == Some(conn) {
                inc.conn = None;
            }
        }
    }

    /// The disk opened the partial file, which holds `have` bytes: the
    /// sender is asked for the rest.
    pub(super) fn on_opened(&mut self, number: u64, have: u64, actions: &mut Actions) {
        let Some(inc) = self.incoming.get_mut(&number) else {
            return;
        };
        inc.phase = InPhase::Receiving {
            received: have,
            written: have,
        };
        inc.progress.restart(actions.now, have);
        if let Some(conn) = inc.conn {
            let frame = protocol::frame(&LinkMsg::FileAccept {
                id: inc.id,
                offset: have,
            });
            actions.send(conn, frame);
        }
        rearm(&mut inc.deadline, number, self.config.offer_ttl, actions);
    }

    /// Every byte before `through` is written: the sender's window moves.
    pub(super) fn on_written(&mut self, number: u64, through: u64, actions: &mut Actions) {
        let Some(inc) = self.incoming.get_mut(&number) else {
            return;
        };
        if let InPhase::Receiving { written, .. } = &mut inc.phase {
            *written = through;
        }
        if let Some(conn) = inc.conn {
            let frame = protocol::frame(&LinkMsg::FileAck {
                id: inc.id,
                offset: through,
            });
            actions.send(conn, frame);
        }
        if let Some((rate, eta_ms)) = inc.progress.tick(actions.now, through, inc.size) {
            let shown = Self::shown_in(number, inc);
            actions.emit(progress_event(shown, through, rate, eta_ms));
        }
        rearm(&mut inc.deadline, number, self.config.offer_ttl, actions);
    }

    /// The whole file matched and is saved at `path`.
    pub(super) fn on_saved(&mut self, number: u64, path: &Path, actions: &mut Actions) {
        let Some(inc) = self.incoming.remove(&number) else {
            return;
        };
        self.by_id.remove(&(inc.key, inc.id));
        actions.cancel(inc.deadline);
        inc.ended(actions);
        if let Some(conn) = inc.conn {
            actions.send(conn, protocol::frame(&LinkMsg::FileDone { id: inc.id }));
        }
        self.remember((inc.key, inc.id), None);
        let shown = Self::shown_in(number, &inc);
        actions.emit(Event::FileDone {
            transfer: number,
            direction: shown.direction,
            peer: shown.peer,
            name: shown.name,
            size: shown.size,
            path: path.display().to_string(),
        });
    }

    /// What we receive, when the peer exits (see [`Transfers::exit`]).
    pub(super) fn exit_receiving(&mut self, kept: bool, actions: &mut Actions) {
        for (number, inc) in std::mem::take(&mut self.incoming) {
            actions.cancel(inc.deadline);
            let reason = match inc.phase {
                InPhase::Offered => {
                    "not accepted before quitting; offered again when you are both online"
                }
                InPhase::Resuming | InPhase::Opening | InPhase::Receiving { .. } => {
                    close_file(number, false, actions);
                    if kept {
                        continue;
                    }
                    "paused by quitting: what arrived is kept, and it resumes when the sender offers it again (/accept it then)"
                }
            };
            let shown = Self::shown_in(number, &inc);
            actions.emit(failed_event(shown, FileCode::Cancelled, reason.into()));
        }
        self.by_id.clear();
    }
}
