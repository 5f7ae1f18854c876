//! The report: each point's figures (medians, maxima, the floor and the
//! phases), printed as a progress line, as Markdown tables and as CSV.

use crate::MIB;

/// One point's measurements: every upgrade's figures, the floor, and the
/// naive restart. Milliseconds unless named otherwise.
#[derive(Default, Clone)]
pub struct Row {
    pub name: String,
    pub clients: usize,
    pub state_bytes: f64,
    pub stall: Vec<f64>,
    pub blackout: Vec<f64>,
    pub total: Vec<f64>,
    pub phases: Vec<[f64; 6]>,
    pub dropped: usize,
    pub naive_ms: f64,
    /// Idle clients whose connection the naive restart cost (each asked).
    pub naive_lost: usize,
    pub floor_exec: f64,
    pub floor_fd: f64,
    pub floor_memfd: f64,
}

/// `snapshot`: encoding the state straight into the memfd and sealing it;
/// `exec`: from then to the new image's first instruction of `boot`;
/// `other`: SIGHUP to the probe's start and back to the loop.
pub const PHASES: [&str; 6] = ["probe", "snapshot", "exec", "restore", "adopt", "other"];

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() { 0.0 } else { s[s.len() / 2] }
}

pub fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// A row's figures, computed once for every rendering.
struct Summary {
    stall: (f64, f64),
    blackout: (f64, f64),
    total: f64,
    floor: f64,
    ratio: f64,
    phases: [f64; PHASES.len()],
}

impl Row {
    fn summary(&self) -> Summary {
        let floor = self.floor_exec + self.floor_fd + self.floor_memfd;
        let blackout = (median(&self.blackout), max(&self.blackout));
        Summary {
            stall: (median(&self.stall), max(&self.stall)),
            blackout,
            total: median(&self.total),
            floor,
            ratio: blackout.0 / floor.max(1e-9),
            phases: std::array::from_fn(|i| {
                median(&self.phases.iter().map(|p| p[i]).collect::<Vec<_>>())
            }),
        }
    }
}

pub fn print_row(r: &Row) {
    let m = r.summary();
    eprintln!(
        "  stall median {:.2} ms max {:.2} | blackout median {:.2} max {:.2} | floor {:.2} ({:.1}x) | dropped {} | naive restart {:.1} ms, {} lost",
        m.stall.0,
        m.stall.1,
        m.blackout.0,
        m.blackout.1,
        m.floor,
        m.ratio,
        r.dropped,
        r.naive_ms,
        r.naive_lost
    );
}

pub fn print_table(rows: &[Row]) {
    println!(
        "| point | state | client stall ms (median / max) | blackout ms (median / max) | floor ms (exec + fds + memfd) | x floor | SIGHUP to serving ms | dropped | naive restart ms | naive lost |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let m = r.summary();
        println!(
            "| {} | {:.1} MiB | {:.2} / {:.2} | {:.2} / {:.2} | {:.2} ({:.2} + {:.2} + {:.2}) | {:.2} | {:.1} | {} | {:.1} | {} |",
            r.name,
            r.state_bytes / MIB as f64,
            m.stall.0,
            m.stall.1,
            m.blackout.0,
            m.blackout.1,
            m.floor,
            r.floor_exec,
            r.floor_fd,
            r.floor_memfd,
            m.ratio,
            m.total,
            r.dropped,
            r.naive_ms,
            r.naive_lost
        );
    }
    println!("\nphases, median ms:\n");
    println!("| point | {} |", PHASES.join(" | "));
    println!("|---|{}", "---|".repeat(PHASES.len()));
    for r in rows {
        let cols: Vec<String> = r
            .summary()
            .phases
            .iter()
            .map(|p| format!("{p:.2}"))
            .collect();
        println!("| {} | {} |", r.name, cols.join(" | "));
    }
}

pub fn to_csv(rows: &[Row]) -> String {
    let mut s = String::from(
        "point,clients,state_bytes,stall_median_ms,stall_max_ms,blackout_median_ms,blackout_max_ms,total_median_ms,floor_ms,floor_exec_ms,floor_fd_ms,floor_memfd_ms,dropped,naive_restart_ms,naive_lost",
    );
    for p in PHASES {
        s.push_str(&format!(",{p}_median_ms"));
    }
    s.push('\n');
    for r in rows {
        let m = r.summary();
        let mut fields = vec![
            format!("\"{}\"", r.name),
            r.clients.to_string(),
            r.state_bytes.to_string(),
        ];
        let figures = [
            m.stall.0,
            m.stall.1,
            m.blackout.0,
            m.blackout.1,
            m.total,
            m.floor,
            r.floor_exec,
            r.floor_fd,
            r.floor_memfd,
        ];
        fields.extend(figures.iter().map(|f| format!("{f:.3}")));
        fields.extend([
            r.dropped.to_string(),
            format!("{:.3}", r.naive_ms),
            r.naive_lost.to_string(),
        ]);
        fields.extend(m.phases.iter().map(|p| format!("{p:.3}")));
        s.push_str(&fields.join(","));
        s.push('\n');
    }
    s
}
