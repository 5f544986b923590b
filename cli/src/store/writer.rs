//! One transaction's worth of records, written row by row.

use std::collections::HashMap;

use peerchat_core::identity::PublicKey;
use rusqlite::{params, Connection};

use super::int;
use crate::journal::{Incoming, Outgoing, Party, Record};

/// What a write needs across its records.
pub(super) struct Writer<'a> {
    conn: &'a Connection,
    pids: &'a mut HashMap<PublicKey, (i64, String)>,
    history: bool,
    /// The highest acknowledgement per target, written once at the end:
    /// acknowledgements come one per target and message, and nothing in a
    /// write reads them.
    acked: HashMap<PublicKey, u64>,
    /// Likewise the next id: above every id sent.
    next_id: Option<u64>,
}

impl<'a> Writer<'a> {
    pub(super) fn new(
        conn: &'a Connection,
        pids: &'a mut HashMap<PublicKey, (i64, String)>,
        history: bool,
    ) -> Self {
        Writer {
            conn,
            pids,
            history,
            acked: HashMap::new(),
            next_id: None,
        }
    }

    pub(super) fn record(&mut self, record: &Record) -> rusqlite::Result<()> {
        match record {
            Record::Sent(outgoing) => self.sent(outgoing),
            Record::Acked { target, through } => {
                let highest = self.acked.entry(*target).or_insert(*through);
                *highest = (*highest).max(*through);
                Ok(())
            }
            Record::Failed {
                id,
                target,
                reason,
                at,
            } => {
                self.conn
                    .prepare_cached(
                        "INSERT OR IGNORE INTO failures (id, pid, reason, at)
                         SELECT ?1, pid, ?3, ?4 FROM peers WHERE key = ?2",
                    )?
                    .execute(params![
                        int(*id),
                        target.as_bytes().as_slice(),
                        reason,
                        int(*at)
                    ])?;
                Ok(())
            }
            Record::Settled { id } => {
                if self.history {
                    self.conn
                        .prepare_cached(
                            "UPDATE messages SET pending = 0 WHERE pending = 1 AND id = ?1",
                        )?
                        .execute([int(*id)])?;
                } else {
                    self.conn
                        .prepare_cached("DELETE FROM messages WHERE pending = 1 AND id = ?1")?
                        .execute([int(*id)])?;
                    self.conn
                        .prepare_cached("DELETE FROM failures WHERE id = ?1")?
                        .execute([int(*id)])?;
                }
                Ok(())
            }
            Record::Received(incoming) => self.received(incoming),
            Record::Transfer(transfer) => {
                let pid = self.pid(&transfer.peer)?;
                self.conn
                    .prepare_cached(
                        "INSERT OR REPLACE INTO transfers
                             (id, outgoing, pid, path, name, size, sha256)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    )?
                    .execute(params![
                        int(transfer.id),
                        transfer.outgoing,
                        pid,
                        transfer.path,
                        transfer.name,
                        int(transfer.size),
                        transfer.sha256.as_slice(),
                    ])?;
                Ok(())
            }
            Record::TransferEnded { peer, id, outgoing } => {
                self.conn
                    .prepare_cached(
                        "DELETE FROM transfers WHERE id = ?2 AND outgoing = ?3
                         AND pid = (SELECT pid FROM peers WHERE key = ?1)",
                    )?
                    .execute(params![peer.as_bytes().as_slice(), int(*id), outgoing])?;
                Ok(())
            }
        }
    }

    fn sent(&mut self, outgoing: &Outgoing) -> rusqlite::Result<()> {
        let mut targets = Vec::with_capacity(outgoing.targets.len() * 4);
        let mut conversation = None;
        for party in &outgoing.targets {
            let pid = self.pid(party)?;
            let packed = u32::try_from(pid).map_err(|_| {
                rusqlite::Error::ToSqlConversionFailure(
                    format!("peer number {pid} is too large for a list of targets").into(),
                )
            })?;
            targets.extend_from_slice(&packed.to_le_bytes());
            conversation = Some(pid);
        }
        if !outgoing.direct || outgoing.targets.len() != 1 {
            conversation = None;
        }
        self.conn
            .prepare_cached(
                "INSERT INTO messages
                     (id, outgoing, conversation, text, direct, sent_at, received_at, targets, pending)
                 VALUES (?1, 1, ?2, ?3, ?4, ?5, ?5, ?6, 1)",
            )?
            .execute(params![
                int(outgoing.id),
                conversation,
                outgoing.text,
                outgoing.direct,
                int(outgoing.sent_at),
                targets,
            ])?;
        let next = outgoing.id.saturating_add(1);
        self.next_id = Some(self.next_id.map_or(next, |n| n.max(next)));
        Ok(())
    }

    fn received(&mut self, incoming: &Incoming) -> rusqlite::Result<()> {
        let from = &incoming.from;
        // The id shown counts within the sender's instance: a new instance
        // starts over.
        let pid: i64 = self
            .conn
            .prepare_cached(concat!(
                "INSERT INTO peers (key, name, seen_instance, seen_id) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (key) DO UPDATE SET
                     name = excluded.name,
                     seen_id = CASE WHEN seen_instance IS excluded.seen_instance
                         THEN ",
                umax!("seen_id", "excluded.seen_id"),
                " ELSE excluded.seen_id END,
                     seen_instance = excluded.seen_instance
                 RETURNING pid"
            ))?
            .query_row(
                params![
                    from.key.as_bytes().as_slice(),
                    from.name,
                    int(incoming.instance),
                    int(incoming.id)
                ],
                |row| row.get(0),
            )?;
        self.pids.insert(from.key, (pid, from.name.clone()));
        if self.history {
            self.conn
                .prepare_cached(
                    "INSERT INTO messages
                         (id, outgoing, sender, conversation, text, direct, sent_at, received_at)
                     VALUES (?1, 0, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    int(incoming.id),
                    pid,
                    incoming.direct.then_some(pid),
                    incoming.text,
                    incoming.direct,
                    incoming.sent_at.map(int),
                    int(incoming.received_at),
                ])?;
        }
        Ok(())
    }

    /// The party's pid, its row made or renamed if needed.
    fn pid(&mut self, party: &Party) -> rusqlite::Result<i64> {
        if let Some((pid, name)) = self.pids.get(&party.key) {
            if *name == party.name {
                return Ok(*pid);
            }
        }
        let pid = self
            .conn
            .prepare_cached(
                "INSERT INTO peers (key, name) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET name = excluded.name
                 RETURNING pid",
            )?
            .query_row(
                params![party.key.as_bytes().as_slice(), party.name],
                |row| row.get(0),
            )?;
        self.pids.insert(party.key, (pid, party.name.clone()));
        Ok(pid)
    }

    pub(super) fn finish(self) -> rusqlite::Result<()> {
        let mut ack = self.conn.prepare_cached(concat!(
            "UPDATE peers SET acked_through = ",
            umax!("acked_through", "?2"),
            " WHERE key = ?1"
        ))?;
        for (key, through) in &self.acked {
            ack.execute(params![key.as_bytes().as_slice(), int(*through)])?;
        }
        if let Some(next) = self.next_id {
            self.conn
                .prepare_cached(concat!(
                    "UPDATE meta SET value = ",
                    umax!("value", "?1"),
                    " WHERE key = 'next_id'"
                ))?
                .execute([int(next)])?;
        }
        Ok(())
    }
}
