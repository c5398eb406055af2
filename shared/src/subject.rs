//! NATS subjects of the kanade protocol, built in one place so that host grants, guests
//! and tests cannot drift apart.

/// Per-process snapshots of one PC: `process_perf.{pc_id}`.
pub fn process_perf(pc_id: &str) -> String {
    format!("process_perf.{pc_id}")
}

/// Host-wide snapshots of one PC: `host_perf.{pc_id}`.
pub fn host_perf(pc_id: &str) -> String {
    format!("host_perf.{pc_id}")
}

/// Heartbeats of one PC: `heartbeat.{pc_id}`.
pub fn heartbeat(pc_id: &str) -> String {
    format!("heartbeat.{pc_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_follow_the_kanade_layout() {
        assert_eq!(process_perf("minipc"), "process_perf.minipc");
        assert_eq!(host_perf("minipc"), "host_perf.minipc");
        assert_eq!(heartbeat("minipc"), "heartbeat.minipc");
    }
}
