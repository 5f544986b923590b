//! Process limits that a loop with many connections needs raised: one
//! connection costs one file descriptor, and the usual soft limit (1024)
//! is far below what a registry or a load generator holds.

/// Raises the soft open-file limit towards `want`, never past the hard
/// limit: that one is the administrator's (`ulimit -Hn`, systemd's
/// `LimitNOFILE`). Returns the soft limit in force afterwards.
pub fn raise_fd_limit(want: u64) -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        let target = want.min(limit.rlim_max);
        if limit.rlim_cur >= target {
            return limit.rlim_cur;
        }
        let raised = libc::rlimit {
            rlim_cur: target,
            rlim_max: limit.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
            target
        } else {
            limit.rlim_cur
        }
    }
}
