//! Sending files: our file links to each target, offers (again on every
//! new link), and the window of reads the receiver's acknowledgements
//! open.

use super::*;

impl Transfers {
    /// `/send`: the disk hashes the file; it is offered once that is done.
    pub(in crate::peer) fn send(
        &mut self,
        target: Target,
        path: PathBuf,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let number = self.number();
        actions.host(HostOutput::Disk(DiskOp::Prepare {
            transfer: number,
            path: path.clone(),
        }));
        // The id: never 0, and random, so unique across our restarts.
        let outgoing = Outgoing::new(rng.next() | 1, target.party, path);
        self.outgoing.insert(number, outgoing);
    }

    fn shown_out(number: u64, out: &Outgoing) -> Shown {
        Shown {
            number,
            direction: Direction::Out,
            peer: out.party.name.clone(),
            name: out.name.clone(),
            size: out.size,
        }
    }

    fn offer_frame(out: &Outgoing) -> bytes::Bytes {
        protocol::frame(&LinkMsg::FileOffer {
            id: out.id,
            name: out.name.clone(),
            size: out.size,
            sha256: out.sha256,
        })
    }

    pub(super) fn on_prepared(
        &mut self,
        number: u64,
        name: String,
        size: u64,
        sha256: [u8; 32],
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        if out.kept && (out.size, out.sha256) != (size, sha256) {
            let why = format!("{} changed since it was offered", out.path.display());
            self.fail_out(number, FileCode::Changed, why, actions);
            return;
        }
        out.name = name;
        out.size = size;
        out.sha256 = sha256;
        actions.record(Record::Transfer(journal::Transfer {
            id: out.id,
            outgoing: true,
            peer: out.party.clone(),
            path: out.path.display().to_string(),
            name: out.name.clone(),
            size,
            sha256,
        }));
        out.phase = OutPhase::Offered;
        out.deadline = Some(actions.arm(
            actions.now + self.config.offer_ttl,
            Timer::FileDeadline(number),
        ));
        actions.emit(Event::FileOffer {
            transfer: number,
            direction: Direction::Out,
            peer: out.party.name.clone(),
            name: out.name.clone(),
            size,
            sha256: hex(&sha256),
        });
        let folded = out.folded.clone();
        match self.links.get(&folded).and_then(Dialing::up) {
            Some(conn) => actions.send(conn, Self::offer_frame(out)),
            None => self.ensure_link(&folded, dir, actions),
        }
    }

    /// Whether something waits to go to `folded` over a link.
    fn waits_for_link(&self, folded: &str) -> bool {
        self.outgoing
            .values()
            .any(|o| o.folded == folded && !matches!(o.phase, OutPhase::Preparing))
    }

    /// Dials `folded` if a transfer waits for it and nothing is under way.
    pub(in crate::peer) fn ensure_link(
        &mut self,
        folded: &str,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let Some(known) = dir.get(folded).filter(|k| !k.mismatch) else {
            return;
        };
        if !self.waits_for_link(folded) {
            return;
        }
        let route = Route {
            name: &known.name,
            addr: known.addr,
            unreachable: known.reachable == Some(false),
        };
        let link = self.links.entry(folded.to_string()).or_default();
        let timer = Timer::FileRetry(folded.to_string());
        if let Some(conn) = link.dial(&route, timer, actions) {
            self.conns.insert(conn, folded.to_string());
        }
    }

    /// Our file links, for what the registry says of reversals and
    /// probes.
    pub(in crate::peer) fn targets(&mut self) -> Targets<'_, Dialing> {
        Targets {
            links: &mut self.links,
            conns: &mut self.conns,
        }
    }

    /// Our file link is up and proved `key`: if that is the listed key,
    /// say hello and offer (again) every transfer for the target.
    #[allow(clippy::too_many_arguments)]
    pub(in crate::peer) fn on_connected(
        &mut self,
        conn: LinkId,
        key: PublicKey,
        hello: &LinkMsg,
        now: Instant,
        dir: &mut Directory,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(folded) = self.conns.get(&conn).cloned() else {
            return;
        };
        let listed = dir.get(&folded).filter(|k| k.key == key && !k.mismatch);
        if listed.is_none() {
            tracing::warn!(peer = %folded, %key, "a file link proved another key than the listed one; refused");
            self.drop_conn(conn, &folded);
            actions.close(conn, "the key is not the listed one");
            self.schedule_redial(&folded, now, rng, actions);
            return;
        }
        dir.pin(&folded, key, actions);
        actions.send(conn, protocol::frame(hello));
        if let Some(link) = self.links.get_mut(&folded) {
            link.set_up();
        }
        for out in self.outgoing.values_mut() {
            if out.folded == folded && !matches!(out.phase, OutPhase::Preparing) {
                out.phase = OutPhase::Offered;
                actions.send(conn, Self::offer_frame(out));
            }
        }
    }

    fn drop_conn(&mut self, conn: LinkId, folded: &str) {
        self.conns.remove(&conn);
        if let Some(link) = self.links.get_mut(folded) {
            link.lost(conn);
        }
    }

    /// A frame on our file link: the receiver's answers.
    pub(in crate::peer) fn on_frame(&mut self, conn: LinkId, body: &[u8], actions: &mut Actions) {
        let Some(folded) = self.conns.get(&conn).cloned() else {
            return;
        };
        let msg = match codec::decode::<LinkMsg>(body) {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(peer = %folded, error = %e, "undecodable frame on a file link; closing it");
                actions.close(conn, format!("undecodable frame: {e}"));
                return;
            }
        };
        let id = match &msg {
            LinkMsg::FileAccept { id, .. }
            | LinkMsg::FileAck { id, .. }
            | LinkMsg::FileDone { id }
            | LinkMsg::FileCancel { id, .. } => *id,
            LinkMsg::Error { code, reason } => {
                tracing::warn!(peer = %folded, %code, %reason, "the peer refused our file link");
                return;
            }
            other => {
                tracing::warn!(peer = %folded, ?other, "unexpected message on a file link; closing it");
                actions.close(conn, "unexpected message");
                return;
            }
        };
        let found = self
            .outgoing
            .iter()
            .find(|(_, o)| o.id == id && o.folded == folded)
            .map(|(n, _)| *n);
        let Some(number) = found else {
            if !matches!(msg, LinkMsg::FileCancel { .. } | LinkMsg::FileDone { .. }) {
                actions.send(
                    conn,
                    cancel_frame(id, FileCode::Unknown, "no such transfer"),
                );
            }
            return;
        };
        match msg {
            LinkMsg::FileAccept { offset, .. } => self.on_accept(number, offset, actions),
            LinkMsg::FileAck { offset, .. } => self.on_ack(number, offset, actions),
            LinkMsg::FileDone { .. } => self.on_done(number, actions),
            LinkMsg::FileCancel { code, reason, .. } => {
                if let Some(out) = self.outgoing.remove(&number) {
                    self.end_out(
                        number,
                        out,
                        FileCode::parse(&code),
                        format!("{}: {reason}", folded),
                        false,
                        actions,
                    );
                }
            }
            _ => {}
        }
    }

    fn on_accept(&mut self, number: u64, offset: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        if offset > out.size || matches!(out.phase, OutPhase::Preparing) {
            let why = format!("accepted from byte {offset} of {}", out.size);
            self.fail_out(number, FileCode::Protocol, why, actions);
            return;
        }
        if let Some(link) = self.links.get_mut(&out.folded) {
            link.progressed();
        }
        out.epoch += 1;
        out.phase = OutPhase::Sending {
            acked: offset,
            sent: offset,
            requested: offset,
        };
        out.progress.restart(actions.now, offset);
        self.rearm_out(number, actions);
        self.pump(number, actions);
    }

    fn on_ack(&mut self, number: u64, offset: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending { acked, sent, .. } = &mut out.phase else {
            return;
        };
        if offset > *sent {
            let why = format!("acknowledged byte {offset} of the {sent} sent");
            self.fail_out(number, FileCode::Protocol, why, actions);
            return;
        }
        *acked = (*acked).max(offset);
        let bytes = *acked;
        if let Some((rate, eta_ms)) = out.progress.tick(actions.now, bytes, out.size) {
            let shown = Self::shown_out(number, out);
            actions.emit(progress_event(shown, bytes, rate, eta_ms));
        }
        self.rearm_out(number, actions);
        self.pump(number, actions);
    }

    fn on_done(&mut self, number: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.remove(&number) else {
            return;
        };
        actions.cancel(out.deadline);
        out.ended(actions);
        close_file(number, false, actions);
        let shown = Self::shown_out(number, &out);
        actions.emit(Event::FileDone {
            transfer: number,
            direction: shown.direction,
            peer: shown.peer,
            name: shown.name,
            size: shown.size,
            path: out.path.display().to_string(),
        });
        self.release_link(&out.folded, actions);
    }

    /// Closes our file link to `folded` once nothing more goes on it.
    fn release_link(&mut self, folded: &str, actions: &mut Actions) {
        if self.outgoing.values().any(|o| o.folded == folded) {
            return;
        }
        if let Some(conn) = self.links.remove(folded).and_then(|mut l| l.stop(actions)) {
            self.conns.remove(&conn);
            actions.close(conn, "no more files to send");
        }
    }

    /// Asks the disk for what the window lets out.
    fn pump(&mut self, number: u64, actions: &mut Actions) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending {
            acked, requested, ..
        } = &mut out.phase
        else {
            return;
        };
        while *requested < out.size && *requested - *acked < WINDOW {
            let len = (out.size - *requested).min(CHUNK as u64);
            actions.host(HostOutput::Disk(DiskOp::Read {
                transfer: number,
                epoch: out.epoch,
                offset: *requested,
                len: len as usize,
            }));
            *requested += len;
        }
    }

    pub(super) fn on_read(
        &mut self,
        number: u64,
        epoch: u32,
        offset: u64,
        data: Vec<u8>,
        actions: &mut Actions,
    ) {
        let Some(out) = self.outgoing.get_mut(&number) else {
            return;
        };
        let OutPhase::Sending { sent, .. } = &mut out.phase else {
            return;
        };
        let conn = self.links.get(&out.folded).and_then(Dialing::up);
        let (Some(conn), true) = (conn, out.epoch == epoch && offset == *sent) else {
            return;
        };
        *sent += data.len() as u64;
        actions.send(
            conn,
            protocol::frame(&LinkMsg::FileChunk {
                id: out.id,
                offset,
                data,
            }),
        );
    }

    /// The deadline counts again from now: the transfer moved.
    fn rearm_out(&mut self, number: u64, actions: &mut Actions) {
        if let Some(out) = self.outgoing.get_mut(&number) {
            rearm(&mut out.deadline, number, self.config.offer_ttl, actions);
        }
    }

    /// No path to `folded` is left (`code` says why): what we send it ends
    /// now rather than at its deadline.
    pub(in crate::peer) fn fail_unreachable(
        &mut self,
        folded: &str,
        code: FileCode,
        actions: &mut Actions,
    ) {
        let ending: Vec<(u64, String)> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.folded == folded)
            .map(|(n, o)| (*n, o.party.name.clone()))
            .collect();
        for (number, name) in ending {
            let reason = format!(
                "no path to {name}: it cannot be dialed, and the registry would not relay the link"
            );
            self.fail_out(number, code, reason, actions);
        }
    }

    /// Ends an outgoing transfer for `code`, telling the receiver.
    pub(super) fn fail_out(
        &mut self,
        number: u64,
        code: FileCode,
        reason: String,
        actions: &mut Actions,
    ) {
        if let Some(out) = self.outgoing.remove(&number) {
            self.end_out(number, out, code, reason, true, actions);
        }
    }

    fn end_out(
        &mut self,
        number: u64,
        out: Outgoing,
        code: FileCode,
        reason: String,
        tell: bool,
        actions: &mut Actions,
    ) {
        actions.cancel(out.deadline);
        out.ended(actions);
        close_file(number, false, actions);
        let conn = self.links.get(&out.folded).and_then(Dialing::up);
        if let (true, Some(conn), false) = (tell, conn, matches!(out.phase, OutPhase::Preparing)) {
            actions.send(conn, cancel_frame(out.id, code, reason.clone()));
        }
        actions.emit(failed_event(Self::shown_out(number, &out), code, reason));
        self.release_link(&out.folded, actions);
    }

    pub(in crate::peer) fn on_closed(
        &mut self,
        conn: LinkId,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        let Some(folded) = self.conns.remove(&conn) else {
            return;
        };
        if let Some(link) = self.links.get_mut(&folded) {
            link.lost(conn);
        }
        self.pause(&folded);
        self.schedule_redial(&folded, now, rng, actions);
    }

    /// What was being sent to `folded` waits to be accepted again, over
    /// the next link.
    fn pause(&mut self, folded: &str) {
        for out in self.outgoing.values_mut() {
            if out.folded == folded && matches!(out.phase, OutPhase::Sending { .. }) {
                out.phase = OutPhase::Offered;
            }
        }
    }

    fn schedule_redial(
        &mut self,
        folded: &str,
        now: Instant,
        rng: &mut Rng,
        actions: &mut Actions,
    ) {
        if !self.waits_for_link(folded) {
            return;
        }
        let timer = Timer::FileRetry(folded.to_string());
        let backoff = (self.backoff_min, self.backoff_max);
        let link = self.links.entry(folded.to_string()).or_default();
        link.retry_later(backoff, timer, now, rng, actions);
    }

    pub(in crate::peer) fn on_retry(
        &mut self,
        folded: &str,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        if let Some(link) = self.links.get_mut(folded) {
            link.retried();
        }
        self.ensure_link(folded, dir, actions);
    }

    /// The directory lists `folded` under `key`: transfers offered to
    /// another key end; the others go on (a link is dialed).
    pub(in crate::peer) fn on_listed(
        &mut self,
        folded: &str,
        key: PublicKey,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        let stale: Vec<u64> = self
            .outgoing
            .iter()
            .filter(|(_, o)| o.folded == folded && o.party.key != key)
            .map(|(n, _)| *n)
            .collect();
        for number in stale {
            let reason = format!("{folded} is listed with another key now");
            self.fail_out(number, FileCode::KeyChanged, reason, actions);
        }
        self.ensure_link(folded, dir, actions);
    }

    /// The directory has `folded` at another address: the link goes, and
    /// a new one is dialed.
    /// `folded` can be dialed now: a relayed file link to it gives way to a
    /// direct one (transfers resume over it).
    pub(in crate::peer) fn go_direct(
        &mut self,
        folded: &str,
        dir: &Directory,
        actions: &mut Actions,
    ) {
        if self.links.get(folded).is_some_and(Dialing::is_indirect) {
            self.redial(folded, dir, actions);
        }
    }

    pub(in crate::peer) fn redial(&mut self, folded: &str, dir: &Directory, actions: &mut Actions) {
        self.away(folded, actions);
        self.ensure_link(folded, dir, actions);
    }

    /// `folded` left: our link to it closes; transfers wait for it to be
    /// back (within their deadline).
    pub(in crate::peer) fn away(&mut self, folded: &str, actions: &mut Actions) {
        if let Some(conn) = self.links.get_mut(folded).and_then(|l| l.stop(actions)) {
            self.conns.remove(&conn);
            actions.close(conn, "the peer left");
        }
        self.pause(folded);
    }

    /// The disk cannot go on with a file we send.
    pub(super) fn on_disk_failed(
        &mut self,
        number: u64,
        code: FileCode,
        message: String,
        actions: &mut Actions,
    ) {
        let Some(out) = self.outgoing.get(&number) else {
            return;
        };
        // A file offered before a restart and unreadable now is not the
        // file offered, whatever the disk said.
        let again = out.kept && matches!(out.phase, OutPhase::Preparing);
        let code = if again { FileCode::Changed } else { code };
        self.fail_out(number, code, message, actions);
    }

    /// What we send, when the peer exits (see [`Transfers::exit`]).
    pub(super) fn exit_sending(&mut self, kept: bool, actions: &mut Actions) {
        for (number, out) in std::mem::take(&mut self.outgoing) {
            // Not offered yet, so not in the store: nothing to resume.
            let unkept = matches!(out.phase, OutPhase::Preparing) && !out.kept;
            if kept && !unkept {
                actions.cancel(out.deadline);
                close_file(number, false, actions);
            } else {
                let why = match unkept {
                    true => "the sender quit before the file was hashed",
                    false => "the sender quit",
                };
                self.end_out(number, out, FileCode::Cancelled, why.into(), true, actions);
            }
        }
    }
}
