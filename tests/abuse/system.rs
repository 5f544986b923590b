//! The registry's health while it is attacked: its descriptors and memory
//! against a baseline, its being alive, and sockets set up the odd ways the
//! attacks need.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use peerchat_testkit::client::Secure;
use peerchat_testkit::launch::Registry;
use peerchat_testkit::procfs::{fd_count, rss_kib};

/// What "closed at once" means for a connection that broke the rules: well
/// under every deadline a connection could be closed by instead.
pub const AT_ONCE: Duration = Duration::from_secs(3);
/// Descriptors the registry may hold above its baseline once a case is over.
pub const FD_SLACK: usize = 5;
/// Resident memory the registry may hold above its baseline (KiB).
pub const RSS_SLACK_KIB: u64 = 8 * 1024;

/// Serialises the tests that open hundreds of sockets or measure time
/// closely; a failed test must not poison the others.
pub fn heavy() -> MutexGuard<'static, ()> {
    static HEAVY: Mutex<()> = Mutex::new(());
    HEAVY.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub fds: usize,
    pub rss_kib: u64,
}

pub fn usage(pid: i32) -> Usage {
    Usage {
        fds: fd_count(pid),
        rss_kib: rss_kib(pid),
    }
}

/// Waits (bounded) for the registry's descriptors and memory to come back
/// to its baseline (memory is trimmed at its next stats line), then checks
/// both against it.
pub fn settle(label: &str, pid: i32, base: Usage) -> Usage {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = usage(pid);
    for _ in 0..500 {
        let back = now.fds <= base.fds && now.rss_kib <= base.rss_kib + 2048;
        if back || Instant::now() >= deadline {
            break;
        }
        thread::sleep(Duration::from_millis(10));
        now = usage(pid);
    }
    eprintln!(
        "[{label}] registry fds {} -> {}, VmRSS {} -> {} KiB",
        base.fds, now.fds, base.rss_kib, now.rss_kib
    );
    assert!(
        now.fds <= base.fds + FD_SLACK,
        "{label}: the registry holds {} descriptors, {} at the baseline",
        now.fds,
        base.fds
    );
    assert!(
        now.rss_kib <= base.rss_kib + RSS_SLACK_KIB,
        "{label}: the registry's VmRSS is {} KiB, {} KiB at the baseline",
        now.rss_kib,
        base.rss_kib
    );
    now
}

pub fn assert_alive(label: &str, reg: &mut Registry) {
    let status = reg.proc.child.try_wait().expect("try_wait");
    assert!(
        status.is_none(),
        "{label}: the registry died ({status:?}); stderr: {:?}",
        reg.proc.stderr.snapshot()
    );
    assert!(
        !reg.proc.stderr.contains("panicked"),
        "{label}: the registry panicked: {:?}",
        reg.proc.stderr.snapshot()
    );
}

/// Connects with a small receive buffer set before the handshake, so that
/// the advertised window stays small and the other side has to queue.
pub fn connect_small_rcvbuf(addr: SocketAddr, rcvbuf: i32) -> TcpStream {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only: {addr}")
    };
    // SAFETY: plain socket calls on a descriptor we create and then hand to
    // a TcpStream that owns it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let rc = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &rcvbuf as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "SO_RCVBUF: {}", std::io::Error::last_os_error());
        let sin = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from_ne_bytes(v4.ip().octets()),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::connect(
            fd,
            &sin as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            libc::close(fd);
            panic!("connect {addr}: {err}");
        }
        let stream = TcpStream::from_raw_fd(fd);
        stream.set_nodelay(true).unwrap();
        stream
    }
}

/// Closes with a reset instead of a FIN: SO_LINGER {on, 0 s}, then close.
pub fn close_with_reset(s: Secure) {
    let stream = s.get_ref();
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: sets a socket option on a descriptor the stream owns.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
    drop(s);
}
