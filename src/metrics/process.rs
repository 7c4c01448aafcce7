//! Process figures read from /proc (Linux): CPU seconds and resident memory.

/// CPU time and resident memory of this process.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Process {
    /// User + system CPU seconds.
    pub cpu_seconds: f64,
    pub resident_bytes: u64,
}

/// `None` where /proc is missing or unreadable.
pub fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    parse(&stat, &statm, ticks_per_second(), page_size())
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

/// Parse /proc/self/stat (fields 14 utime and 15 stime, in ticks; the
/// command name in field 2 may hold spaces and parentheses, so count from
/// the last ')') and /proc/self/statm (field 2, resident pages).
fn parse(stat: &str, statm: &str, ticks: f64, page: u64) -> Option<Process> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // rest starts at field 3 (state); utime is field 14 → index 11.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    let resident: u64 = statm.split_ascii_whitespace().nth(1)?.parse().ok()?;
    Some(Process {
        cpu_seconds: (utime + stime) as f64 / ticks,
        resident_bytes: resident * page,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_proc_lines() {
        let stat = "1234 (beast (x) y) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 5 0 100 1000000 300 18446744073709551615";
        let p = super::parse(stat, "5000 300 100 1 0 200 0\n", 100.0, 4096).unwrap();
        assert_eq!(p.cpu_seconds, 3.0);
        assert_eq!(p.resident_bytes, 300 * 4096);
        assert!(super::parse("garbage", "", 100.0, 4096).is_none());
    }

    #[test]
    fn reads_this_process() {
        let p = super::read().expect("/proc is readable on Linux");
        assert!(p.resident_bytes > 0);
    }
}
