//! `collector:api/processes`: enumeration through the configured [`ProcessSource`].
//!
//! [`ProcessSource`]: crate::source::ProcessSource

use super::HostState;
use super::HostStats;
use super::collector::api::processes::{Fields, Host, ProcessSample, SampleError};
use crate::source;

impl Host for HostState {
    fn sample(&mut self, fields: Fields) -> Result<ProcessSample, SampleError> {
        let wanted = source::Fields {
            cpu: fields.contains(Fields::CPU),
            memory: fields.contains(Fields::MEMORY),
            disk: fields.contains(Fields::DISK),
        };
        let table = self.host_work(|s| s.services.processes.sample(wanted));
        let stats = &self.services.stats;
        HostStats::bump(&stats.samples, 1);
        let table = table.map_err(|e| {
            tracing::warn!(guest = %self.guest_name, error = %e, "process sampling failed");
            SampleError::Failed(e)
        })?;
        HostStats::bump(&stats.processes_sampled, table.len() as u64);
        tracing::trace!(guest = %self.guest_name, processes = table.len(), "sampled");
        Ok(ProcessSample {
            pids: table.pids,
            cpu_pct: table.cpu_pct,
            rss_bytes: table.rss_bytes,
            disk_read_bytes: table.disk_read_bytes,
            disk_written_bytes: table.disk_written_bytes,
        })
    }

    fn names(&mut self, pids: Vec<u32>) -> Vec<String> {
        let names = self.host_work(|s| s.services.processes.names(&pids));
        let stats = &self.services.stats;
        HostStats::bump(&stats.name_calls, 1);
        HostStats::bump(&stats.names_looked_up, names.len() as u64);
        names
    }
}
