//! Results: rows of the table, percentiles, the printed table and the JSON file.

use serde::Serialize;

/// One line of the table: a metric of mlschat, the peer's value measured in the same run, and
/// their ratio (ours / peer, so that "at most 1.0x" targets read directly for latencies and
/// "at least 1.0x" for rates).
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub figure: u8,
    pub metric: String,
    /// Group size, subscriber count or other scale of the row ("-" when none).
    pub scale: String,
    pub unit: String,
    pub ours: Option<f64>,
    pub peer: String,
    pub peer_value: Option<f64>,
    pub ratio: Option<f64>,
    /// The target, in words, if the issue sets one for this row.
    pub target: Option<String>,
    /// `Some(true)` met, `Some(false)` missed, `None` no target or not measurable.
    pub met: Option<bool>,
    pub note: String,
}

impl Row {
    pub fn new(figure: u8, metric: impl Into<String>, scale: impl ToString, unit: &str) -> Row {
        Row {
            figure,
            metric: metric.into(),
            scale: scale.to_string(),
            unit: unit.to_string(),
            ours: None,
            peer: "-".into(),
            peer_value: None,
            ratio: None,
            target: None,
            met: None,
            note: String::new(),
        }
    }

    pub fn ours(mut self, value: f64) -> Row {
        self.ours = Some(value);
        self.update_ratio();
        self
    }

    pub fn peer(mut self, name: impl Into<String>, value: Option<f64>) -> Row {
        self.peer = name.into();
        self.peer_value = value;
        self.update_ratio();
        self
    }

    /// A peer that could not be reached: reported as missing, never dropped.
    pub fn peer_missing(mut self, name: &str, why: &str) -> Row {
        self.peer = format!("{name} (MISSING)");
        self.peer_value = None;
        self.ratio = None;
        self.note = join_note(&self.note, &format!("{name} missing: {why}"));
        self
    }

    /// `higher_is_better`: the target is ratio >= bound; otherwise ratio <= bound.
    pub fn target(mut self, words: &str, bound: f64, higher_is_better: bool) -> Row {
        self.target = Some(words.to_string());
        self.met = self.ratio.map(|ratio| {
            if higher_is_better {
                ratio >= bound
            } else {
                ratio <= bound
            }
        });
        self
    }

    pub fn note(mut self, note: impl AsRef<str>) -> Row {
        self.note = join_note(&self.note, note.as_ref());
        self
    }

    fn update_ratio(&mut self) {
        self.ratio = match (self.ours, self.peer_value) {
            (Some(ours), Some(peer)) if peer > 0.0 => Some(ours / peer),
            _ => None,
        };
    }
}

fn join_note(old: &str, new: &str) -> String {
    if old.is_empty() {
        new.to_string()
    } else {
        format!("{old}; {new}")
    }
}

/// Percentile of already sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

pub fn median(values: &[f64]) -> f64 {
    percentile(&sorted(values.to_vec()), 50.0)
}

fn format_value(value: Option<f64>) -> String {
    match value {
        None => "-".into(),
        Some(value) if value.is_nan() => "-".into(),
        Some(value) if value.abs() >= 100_000.0 => format!("{value:.0}"),
        Some(value) if value.abs() >= 100.0 => format!("{value:.0}"),
        Some(value) if value.abs() >= 10.0 => format!("{value:.1}"),
        Some(value) => format!("{value:.3}"),
    }
}

/// The table as Markdown, the form docs/benchmarks.md uses.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| fig | metric | scale | unit | mlschat | peer | peer value | ratio | target | met | note |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for row in rows {
        let ratio = row
            .ratio
            .map(|ratio| format!("{ratio:.2}x"))
            .unwrap_or_else(|| "-".into());
        let met = match row.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "-",
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            row.figure,
            row.metric,
            row.scale,
            row.unit,
            format_value(row.ours),
            row.peer,
            format_value(row.peer_value),
            ratio,
            row.target.as_deref().unwrap_or("-"),
            met,
            row.note.replace('|', "/"),
        ));
    }
    out
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub cpus: usize,
    pub cpu_model: String,
    pub memory_kib: u64,
    pub kernel: String,
    pub rmem_max: String,
}

impl Machine {
    pub fn probe() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|line| line.starts_with("model name"))
            .and_then(|line| line.split(':').nth(1))
            .map(|model| model.trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        let memory_kib = std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find(|line| line.starts_with("MemTotal:"))
            .and_then(|line| line.split_whitespace().nth(1))
            .and_then(|value| value.parse().ok())
            .unwrap_or(0);
        Machine {
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu_model,
            memory_kib,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_string(),
            rmem_max: std::fs::read_to_string("/proc/sys/net/core/rmem_max")
                .unwrap_or_default()
                .trim()
                .to_string(),
        }
    }
}

/// The kernel's UDP receive-buffer drop counter (`Udp: ... RcvbufErrors` in /proc/net/snmp).
pub fn udp_rcvbuf_errors() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut lines = snmp.lines().filter(|line| line.starts_with("Udp:"));
    let header = lines.next()?;
    let values = lines.next()?;
    let column = header
        .split_whitespace()
        .position(|name| name == "RcvbufErrors")?;
    values.split_whitespace().nth(column)?.parse().ok()
}

/// CPU time (user + system, all threads) a process has used so far, in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain numbers, and
    // utime and stime are fields 14 and 15, in clock ticks of USER_HZ (100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

/// Resident set size of a process, in KiB.
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|line| line.starts_with("VmRSS:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|value| value.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seconds_count_this_process_working() {
        let pid = std::process::id();
        let before = cpu_seconds(pid).expect("own /proc stat");
        let started = std::time::Instant::now();
        let mut spin = 0u64;
        let mut now = before;
        // Spin until the count moves (it is in 10 ms ticks); a parse of the wrong fields
        // would stay put (or fail) for the whole 10 s.
        while now < before + 0.05 && started.elapsed() < std::time::Duration::from_secs(10) {
            for _ in 0..100_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
            now = cpu_seconds(pid).expect("own /proc stat");
        }
        assert!(
            now >= before + 0.05,
            "{before} -> {now} after 10 s of spinning"
        );
        assert!(cpu_seconds(u32::MAX).is_none());
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values = sorted((1..=100).map(f64::from).collect());
        assert_eq!(percentile(&values, 50.0), 50.0);
        assert_eq!(percentile(&values, 99.0), 99.0);
        assert_eq!(percentile(&values, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }

    #[test]
    fn ratio_and_targets() {
        let row = Row::new(2, "x", 10, "1/s")
            .ours(50.0)
            .peer("nats", Some(100.0))
            .target(">= 1.0x", 1.0, true);
        assert_eq!(row.ratio, Some(0.5));
        assert_eq!(row.met, Some(false));
        let missing = Row::new(2, "x", 10, "1/s")
            .ours(1.0)
            .peer_missing("redis", "refused");
        assert!(missing.peer.contains("MISSING"));
        assert_eq!(missing.ratio, None);
    }

    #[test]
    fn snmp_counter_is_readable() {
        // Present on every Linux with IPv4; the value itself does not matter.
        assert!(udp_rcvbuf_errors().is_some());
    }
}
