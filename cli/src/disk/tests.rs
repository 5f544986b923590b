use super::*;

#[test]
fn saved_names_never_replace_a_file() {
    assert_eq!(numbered("a.tar.gz", 0), "a.tar.gz");
    assert_eq!(numbered("a.tar.gz", 2), "a (2).tar.gz");
    assert_eq!(numbered("README", 1), "README (1)");
    let dir = tempdir();
    fs::write(dir.join("a.txt"), "old").unwrap();
    fs::write(dir.join("a (1).txt"), "older").unwrap();
    let partial = dir.join(".part");
    fs::write(&partial, "new").unwrap();
    let saved = save(&partial, &dir, "a.txt").unwrap();
    assert_eq!(saved, dir.join("a (2).txt"));
    assert_eq!(fs::read_to_string(dir.join("a.txt")).unwrap(), "old");
    assert_eq!(fs::read_to_string(&saved).unwrap(), "new");
    assert!(!partial.exists());
    fs::remove_dir_all(dir).unwrap();
}

/// A worker's replies to `ops`, in order.
fn run(worker: &mut Worker, ops: Vec<DiskOp>) -> Vec<DiskReply> {
    ops.into_iter().filter_map(|op| worker.handle(op)).collect()
}

fn tempdir() -> PathBuf {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).unwrap();
    let dir = std::env::temp_dir().join(format!("peerchat-disk-{}", u64::from_le_bytes(bytes)));
    fs::create_dir_all(&dir).unwrap();
    dir
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(data);
    digest(ctx)
}

#[test]
fn a_file_goes_from_one_worker_to_another_and_resumes() {
    let dir = tempdir();
    let data: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let source = dir.join("data.bin");
    fs::write(&source, &data).unwrap();
    let mut sender = Worker::default();
    let prepared = run(
        &mut sender,
        vec![DiskOp::Prepare {
            transfer: 1,
            path: source.clone(),
        }],
    );
    assert_eq!(
        prepared,
        vec![DiskReply::Prepared {
            transfer: 1,
            name: "data.bin".into(),
            size: 100_000,
            sha256: sha256(&data),
        }]
    );
    let inbox = dir.join("in");
    let receive = DiskOp::Receive {
        transfer: 9,
        dir: inbox.clone(),
        name: "data.bin".into(),
        id: 0xabc,
        size: 100_000,
        sha256: sha256(&data),
    };
    let mut receiver = Worker::default();
    assert_eq!(
        run(&mut receiver, vec![receive.clone()]),
        vec![DiskReply::Opened {
            transfer: 9,
            have: 0
        }]
    );
    let chunk = |worker: &mut Worker, offset: u64, len: usize| {
        let replies = run(
            worker,
            vec![DiskOp::Read {
                transfer: 1,
                epoch: 3,
                offset,
                len,
            }],
        );
        let [DiskReply::Read { data, epoch: 3, .. }] = &replies[..] else {
            panic!("{replies:?}");
        };
        data.clone()
    };
    let first = chunk(&mut sender, 0, 60_000);
    assert_eq!(
        run(
            &mut receiver,
            vec![DiskOp::Write {
                transfer: 9,
                offset: 0,
                data: first
            }]
        ),
        vec![DiskReply::Written {
            transfer: 9,
            through: 60_000
        }]
    );
    // The receiver restarts: the partial file is found and resumed.
    let mut receiver = Worker::default();
    assert_eq!(
        run(&mut receiver, vec![receive]),
        vec![DiskReply::Opened {
            transfer: 9,
            have: 60_000
        }]
    );
    let rest = chunk(&mut sender, 60_000, 40_000);
    let replies = run(
        &mut receiver,
        vec![DiskOp::Write {
            transfer: 9,
            offset: 60_000,
            data: rest,
        }],
    );
    assert_eq!(
        replies,
        vec![DiskReply::Saved {
            transfer: 9,
            path: inbox.join("data.bin")
        }]
    );
    assert_eq!(fs::read(inbox.join("data.bin")).unwrap(), data);
    assert_eq!(
        fs::read_dir(&inbox).unwrap().count(),
        1,
        "the partial file is gone"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_file_that_does_not_match_is_removed() {
    let dir = tempdir();
    let mut receiver = Worker::default();
    let open = DiskOp::Receive {
        transfer: 2,
        dir: dir.clone(),
        name: "x".into(),
        id: 1,
        size: 3,
        sha256: sha256(b"abc"),
    };
    run(&mut receiver, vec![open]);
    let replies = run(
        &mut receiver,
        vec![DiskOp::Write {
            transfer: 2,
            offset: 0,
            data: b"abd".to_vec(),
        }],
    );
    assert!(
        matches!(
            replies[..],
            [DiskReply::Failed {
                code: FileCode::Corrupt,
                ..
            }]
        ),
        "{replies:?}"
    );
    assert_eq!(
        fs::read_dir(&dir).unwrap().count(),
        0,
        "nothing is left behind"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn an_empty_file_is_saved_at_once_and_a_changed_one_fails() {
    let dir = tempdir();
    let mut receiver = Worker::default();
    let replies = run(
        &mut receiver,
        vec![DiskOp::Receive {
            transfer: 4,
            dir: dir.clone(),
            name: "empty".into(),
            id: 5,
            size: 0,
            sha256: sha256(b""),
        }],
    );
    assert_eq!(
        replies,
        vec![DiskReply::Saved {
            transfer: 4,
            path: dir.join("empty")
        }]
    );

    let source = dir.join("grows.txt");
    fs::write(&source, "12345").unwrap();
    let mut sender = Worker::default();
    run(
        &mut sender,
        vec![DiskOp::Prepare {
            transfer: 1,
            path: source.clone(),
        }],
    );
    fs::write(&source, "123456").unwrap();
    let replies = run(
        &mut sender,
        vec![DiskOp::Read {
            transfer: 1,
            epoch: 0,
            offset: 0,
            len: 5,
        }],
    );
    assert!(
        matches!(
            replies[..],
            [DiskReply::Failed {
                code: FileCode::Changed,
                ..
            }]
        ),
        "{replies:?}"
    );

    let replies = run(
        &mut sender,
        vec![DiskOp::Prepare {
            transfer: 2,
            path: dir.clone(),
        }],
    );
    assert!(
        matches!(
            replies[..],
            [DiskReply::Failed {
                code: FileCode::Io,
                ..
            }]
        ),
        "a directory is refused: {replies:?}"
    );
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_directory_that_cannot_be_made_fails_the_transfer_cleanly() {
    let dir = tempdir();
    fs::write(dir.join("taken"), "a file, not a directory").unwrap();
    let mut receiver = Worker::default();
    let replies = run(
        &mut receiver,
        vec![DiskOp::Receive {
            transfer: 1,
            dir: dir.join("taken/inbox"),
            name: "a".into(),
            id: 2,
            size: 10,
            sha256: sha256(b"0123456789"),
        }],
    );
    assert!(
        matches!(&replies[..], [DiskReply::Failed { code: FileCode::Io, message, .. }] if message.contains("cannot make")),
        "{replies:?}"
    );
    // Writes for it (already on their way) answer nothing.
    let replies = run(
        &mut receiver,
        vec![DiskOp::Write {
            transfer: 1,
            offset: 0,
            data: vec![0; 10],
        }],
    );
    assert!(replies.is_empty());
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_stopping_worker_gives_up_hashing() {
    let dir = tempdir();
    let source = dir.join("big");
    fs::write(&source, vec![1u8; 1 << 20]).unwrap();
    let mut worker = Worker::default();
    worker.stopping.store(true, Ordering::Relaxed);
    let replies = run(
        &mut worker,
        vec![DiskOp::Prepare {
            transfer: 1,
            path: source,
        }],
    );
    assert!(
        matches!(&replies[..], [DiskReply::Failed { code: FileCode::Io, message, .. }] if message.contains("stopping")),
        "{replies:?}"
    );
    fs::remove_dir_all(dir).unwrap();
}
