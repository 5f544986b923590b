//! What a process holds and spends, read from Linux's /proc: the abuse tests
//! check that the registry gives descriptors and memory back, the benches
//! report CPU shares and write calls.

use std::time::Duration;

/// Open descriptors of `pid`: a leak shows here first.
pub fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("/proc/<pid>/fd")
        .count()
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("a VmRSS line")
}

/// User plus system CPU time of `pid` (every thread), in clock ticks: the
/// unit to compare when a tick or two is what matters.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields[11].parse().unwrap();
    let stime: u64 = fields[12].parse().unwrap();
    utime + stime
}

/// How many [`cpu_ticks`] make a second.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// [`cpu_ticks`] as a duration, for CPU shares of wall time.
pub fn cpu_time(pid: i32) -> Duration {
    Duration::from_nanos(cpu_ticks(pid) * 1_000_000_000 / clock_ticks_per_second())
}

/// `write`/`writev` calls of `pid` so far, all threads (`syscw` in
/// /proc/PID/io; `send` and `recv` are not counted there); 0 if unreadable.
pub fn write_calls(pid: i32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    io.lines()
        .find_map(|l| l.strip_prefix("syscw:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
