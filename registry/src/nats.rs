//! Cluster mode, the I/O half: the NATS client on a thread of its own,
//! with its own (tokio) runtime, bridged to the registry's single-threaded
//! loop by two channels: writes go in, [`ClusterEvent`]s come out, and
//! each event wakes the loop. The registry machine decides everything
//! (`cluster.rs`); this side only carries records to and from two
//! JetStream key-value buckets:
//!
//! - `peerchat_names`: one record per name (see [`NameRecord`]), history 1,
//!   so that replaying the bucket's stream from any revision delivers the
//!   latest record of every name changed since, in order;
//! - `peerchat_registries`: each registry's heartbeat, a put of its id.

use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::{self, stream, Context};
use async_nats::{ConnectOptions, Event};
use bytes::Bytes;
use futures_util::StreamExt;
use peerchat_core::codec;
use tokio::sync::{mpsc as tokio_mpsc, Semaphore};

use crate::cluster::{ClusterEvent, ClusterWrite, Expect, NameRecord, WriteResult};

pub const NAMES_BUCKET: &str = "peerchat_names";
pub const REGISTRIES_BUCKET: &str = "peerchat_registries";

/// How long one JetStream request may take: a claim waits for at most
/// two of them (a write, then a read after a conflict) within its 2 s.
/// Every request, not only writes: a feed made while a NATS server is
/// gone can be placed on it and never answered, and is better tried
/// again at once than after the client's default of 10 s.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(900);

/// How long the names feed may be quiet before the bucket is asked
/// whether it missed something.
const FEED_CHECK: Duration = Duration::from_secs(3);

/// Writes in flight at once: enough to re-assert thousands of peers after
/// a partition quickly, without flooding the servers.
const MAX_WRITES_IN_FLIGHT: usize = 256;

/// Where the cluster is and who this registry is in it.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// NATS servers, as `nats://HOST:PORT`.
    pub servers: Vec<String>,
    /// Copies of each bucket the NATS cluster keeps (at most its size).
    pub replicas: usize,
    /// This registry's id, unique in the cluster.
    pub id: String,
    /// How often this registry says it is alive.
    pub heartbeat: Duration,
}

/// A bucket's settings.
struct Bucket {
    name: &'static str,
    description: &'static str,
    replicas: usize,
    /// Zero: kept for ever.
    max_age: Duration,
    storage: stream::StorageType,
}

/// The registry's end of the bridge.
pub struct ClusterLink {
    writes: tokio_mpsc::UnboundedSender<ClusterWrite>,
    events: mpsc::Receiver<ClusterEvent>,
    _thread: JoinHandle<()>,
}

/// Sends events to the loop, waking it for each batch.
#[derive(Clone)]
struct Sink {
    events: mpsc::Sender<ClusterEvent>,
    wake: Arc<dyn Fn() + Send + Sync>,
}

impl Sink {
    fn send(&self, event: ClusterEvent) {
        // The loop is gone only when the registry is exiting.
        if self.events.send(event).is_ok() {
            (self.wake)();
        }
    }
}

impl ClusterLink {
    /// Starts the thread; `wake` wakes the loop.
    pub fn start(
        options: ClusterOptions,
        wake: Arc<dyn Fn() + Send + Sync>,
    ) -> std::io::Result<Self> {
        let (writes, writes_rx) = tokio_mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::channel();
        let sink = Sink {
            events: events_tx,
            wake,
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name("cluster".into())
            .spawn(move || runtime.block_on(serve(options, sink, writes_rx)))?;
        Ok(ClusterLink {
            writes,
            events,
            _thread: thread,
        })
    }

    pub fn write(&self, write: ClusterWrite) {
        // The thread never ends before the registry does.
        let _ = self.writes.send(write);
    }

    pub fn try_event(&self) -> Option<ClusterEvent> {
        self.events.try_recv().ok()
    }
}

async fn serve(
    options: ClusterOptions,
    sink: Sink,
    writes: tokio_mpsc::UnboundedReceiver<ClusterWrite>,
) {
    let events = sink.clone();
    let connect = ConnectOptions::new()
        .name(format!("peerchat-registry {}", options.id))
        .retry_on_initial_connect()
        .max_reconnects(None)
        // A frozen server is noticed in seconds, not the default minutes.
        .ping_interval(Duration::from_secs(2))
        .request_timeout(Some(REQUEST_TIMEOUT))
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis((attempts as u64 * 100).min(2000))
        })
        .event_callback(move |event| {
            let events = events.clone();
            async move {
                match event {
                    Event::Connected => events.send(ClusterEvent::Up),
                    Event::Disconnected => events.send(ClusterEvent::Down {
                        reason: "disconnected from NATS".into(),
                    }),
                    other => tracing::info!(event = %other, "NATS"),
                }
            }
        });
    let client = match connect.connect(options.servers.clone()).await {
        Ok(client) => client,
        Err(e) => {
            tracing::error!(error = %e, "cannot use the cluster's NATS servers");
            sink.send(ClusterEvent::Down {
                reason: e.to_string(),
            });
            return;
        }
    };
    let mut js = jetstream::new(client);
    js.set_timeout(REQUEST_TIMEOUT);
    let names = open_bucket(
        &js,
        Bucket {
            name: NAMES_BUCKET,
            description: "peerchat: who owns each name, and where its peer is",
            replicas: options.replicas,
            max_age: Duration::ZERO,
            storage: stream::StorageType::File,
        },
        &sink,
    )
    .await;
    let registries = open_bucket(
        &js,
        Bucket {
            name: REGISTRIES_BUCKET,
            description: "peerchat: registry heartbeats",
            replicas: options.replicas,
            // Only for tidiness: liveness is judged from the feed.
            max_age: Duration::from_secs(3600),
            storage: stream::StorageType::Memory,
        },
        &sink,
    )
    .await;
    tokio::spawn(heartbeat(
        registries.clone(),
        options.id.clone(),
        options.heartbeat,
    ));
    tokio::spawn(watch_registries(
        registries,
        options.heartbeat,
        sink.clone(),
    ));
    tokio::spawn(watch_names(names.clone(), sink.clone()));
    run_writes(names, writes, sink).await;
}

/// The bucket, made if it does not exist yet; retried until the cluster
/// answers.
///
/// The bucket's stream is made here, with the settings a key-value bucket
/// has, rather than by the client's `create_key_value`: that one first
/// reads the account's limits, in a form nats-server 2.9 does not send.
async fn open_bucket(js: &Context, config: Bucket, sink: &Sink) -> Store {
    let mut warned = false;
    let stream = stream::Config {
        name: format!("KV_{}", config.name),
        description: Some(config.description.into()),
        subjects: vec![format!("$KV.{}.>", config.name)],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        max_age: config.max_age,
        storage: config.storage,
        allow_rollup: true,
        deny_delete: true,
        // Reads after a failed write go to the stream's leader: a replica
        // answering directly may not have the winning write yet, and the
        // conflict would look like a failure.
        allow_direct: false,
        num_replicas: config.replicas,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    loop {
        // A request that times out while the stream is being made is
        // answered by the next: the stream is there by then.
        let opened = match js.get_or_create_stream(stream.clone()).await {
            Ok(_) => js
                .get_key_value(config.name)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match opened {
            Ok(store) => return store,
            Err(e) => {
                if !warned {
                    tracing::warn!(bucket = %config.name, error = %e, replicas = config.replicas, "cannot open the cluster's bucket; retrying (is JetStream on, and are there as many NATS servers as --cluster-replicas?)");
                    warned = true;
                }
                sink.send(ClusterEvent::Down { reason: e });
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

async fn heartbeat(registries: Store, id: String, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    let mut failing = false;
    loop {
        ticks.tick().await;
        match registries.put(&id, Bytes::new()).await {
            Ok(_) if failing => {
                tracing::info!("heartbeats reach the cluster again");
                failing = false;
            }
            Ok(_) => {}
            Err(e) if !failing => {
                tracing::warn!(error = %e, "heartbeat not written; the cluster will find this registry dead if this lasts");
                failing = true;
            }
            Err(_) => {}
        }
    }
}

/// Heartbeats come every `every`: a feed silent for several of them has
/// stalled (its server froze, its consumer was lost) and is made again.
async fn watch_registries(registries: Store, every: Duration, sink: Sink) {
    let stalled = (every * 5).max(Duration::from_secs(2));
    // Said once per outage: a feed that cannot be made is tried every
    // few seconds for as long as it lasts.
    let mut failing = false;
    fn fail(failing: &mut bool, why: String) {
        if !std::mem::replace(failing, true) {
            tracing::info!(%why, "registry heartbeats feed lost; making it again until it flows");
        }
    }
    loop {
        match registries.watch_all().await {
            Ok(mut watch) => loop {
                match tokio::time::timeout(stalled, watch.next()).await {
                    Ok(Some(Ok(entry))) => {
                        if std::mem::take(&mut failing) {
                            tracing::info!("registry heartbeats feed flows again");
                        }
                        if entry.operation == Operation::Put {
                            sink.send(ClusterEvent::Alive {
                                registry: entry.key,
                            })
                        }
                    }
                    Ok(Some(Err(e))) => {
                        fail(&mut failing, e.to_string());
                        break;
                    }
                    Ok(None) => {
                        fail(&mut failing, "the feed ended".into());
                        break;
                    }
                    Err(_) => {
                        fail(&mut failing, format!("no heartbeat in {stalled:?}"));
                        break;
                    }
                }
            },
            Err(e) => fail(&mut failing, e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Follows the names bucket from the start, and on from the last revision
/// seen whenever the feed has to be made again: nothing is missed or seen
/// twice. `CaughtUp` comes once the feed reaches the bucket's head as it
/// was when the feed was made.
async fn watch_names(names: Store, sink: Sink) {
    let mut last = 0u64;
    loop {
        let head = match head_of(&names).await {
            Ok(head) => head,
            Err(e) => {
                sink.send(ClusterEvent::Down {
                    reason: format!("cannot read the names bucket: {e}"),
                });
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut caught_up = head <= last;
        if caught_up {
            sink.send(ClusterEvent::CaughtUp);
        }
        let mut watch = match names.watch_all_from_revision(last + 1).await {
            Ok(watch) => watch,
            Err(e) => {
                tracing::info!(error = %e, "cannot follow the names bucket; trying again");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        loop {
            let entry = match tokio::time::timeout(FEED_CHECK, watch.next()).await {
                Ok(Some(Ok(entry))) => entry,
                Ok(Some(Err(e))) => {
                    tracing::info!(error = %e, "names feed broke; following it again from where it stopped");
                    break;
                }
                Ok(None) => {
                    tracing::info!("names feed ended; following it again from where it stopped");
                    break;
                }
                // Quiet: fine if the bucket is too; if it has moved on
                // without us, the feed has stalled and is made again.
                Err(_) => match head_of(&names).await {
                    Ok(head) if head > last => {
                        tracing::info!(
                            behind = head - last,
                            "names feed stalled; following it again from where it stopped"
                        );
                        break;
                    }
                    Ok(_) => continue,
                    // Made again from where it stopped: that loses and
                    // repeats nothing, and a feed whose server froze may
                    // never say so.
                    Err(e) => {
                        tracing::info!(error = %e, "names feed quiet and the bucket does not answer; following it again");
                        break;
                    }
                },
            };
            // A feed the client made again before it delivered anything
            // starts over from the bucket's first record.
            if entry.revision <= last {
                continue;
            }
            last = entry.revision;
            let record = match entry.operation {
                Operation::Put => decode(&entry.key, &entry.value),
                Operation::Delete | Operation::Purge => None,
            };
            sink.send(ClusterEvent::Record {
                key: entry.key,
                revision: entry.revision,
                record,
            });
            if !caught_up && last >= head {
                caught_up = true;
                sink.send(ClusterEvent::CaughtUp);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The revision of the bucket's latest record, asked of the server:
/// `Store::status` only returns what the client read when it opened the
/// bucket, which would make every feed look caught up for ever.
async fn head_of(bucket: &Store) -> Result<u64, String> {
    match bucket.stream.get_info().await {
        Ok(info) => Ok(info.state.last_sequence),
        Err(e) => Err(e.to_string()),
    }
}

fn decode(key: &str, value: &[u8]) -> Option<NameRecord> {
    match codec::decode::<NameRecord>(value) {
        Ok(record) => Some(record),
        Err(e) => {
            tracing::warn!(record = %key, error = %e, "undecodable name record; it holds no name");
            None
        }
    }
}

async fn run_writes(
    names: Store,
    mut writes: tokio_mpsc::UnboundedReceiver<ClusterWrite>,
    sink: Sink,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_WRITES_IN_FLIGHT));
    while let Some(write) = writes.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let (names, sink) = (names.clone(), sink.clone());
        tokio::spawn(async move {
            let id = write.id;
            let result = compare_and_set(&names, write).await;
            sink.send(ClusterEvent::Written { id, result });
            drop(permit);
        });
    }
}

/// One write, and on failure what the record holds now: a record that is
/// not at the revision expected is a conflict, whatever error the write
/// met; one that is means the write itself failed.
async fn compare_and_set(names: &Store, write: ClusterWrite) -> WriteResult {
    let written = match (&write.record, write.expect) {
        (Some(record), expect) => {
            let value = match codec::encode(record) {
                Ok(value) => Bytes::from(value),
                Err(e) => {
                    return WriteResult::Failed {
                        reason: format!("cannot encode the record: {e}"),
                    }
                }
            };
            match expect {
                Expect::Absent => names
                    .create(&write.key, value)
                    .await
                    .map_err(|e| e.to_string()),
                Expect::Revision(revision) => names
                    .update(&write.key, value, revision)
                    .await
                    .map_err(|e| e.to_string()),
            }
        }
        // The purge's own revision comes with the feed.
        (None, Expect::Revision(revision)) => names
            .purge_expect_revision(&write.key, Some(revision))
            .await
            .map(|()| 0)
            .map_err(|e| e.to_string()),
        (None, Expect::Absent) => Ok(0),
    };
    let error = match written {
        Ok(revision) => return WriteResult::Done { revision },
        Err(error) => error,
    };
    match names.entry(write.key.clone()).await {
        Ok(current) => {
            let current = current.filter(|e| e.operation == Operation::Put);
            let at = current.as_ref().map(|e| e.revision);
            let expected = match write.expect {
                Expect::Absent => None,
                Expect::Revision(revision) => Some(revision),
            };
            if at == expected {
                WriteResult::Failed { reason: error }
            } else {
                WriteResult::Conflict {
                    current: current
                        .and_then(|e| decode(&e.key, &e.value).map(|r| (e.revision, r))),
                }
            }
        }
        Err(e) => WriteResult::Failed {
            reason: format!("{error}; then cannot read the record: {e}"),
        },
    }
}
