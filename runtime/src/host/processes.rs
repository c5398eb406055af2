//! `collector:api/processes`: enumeration through the configured [`ProcessSource`],
//! bounded per call: at most `max_samples_per_call` enumerations and `max_names_per_call`
//! PIDs per look-up, and nothing more once the call's host time budget is spent. The
//! checks come before any per-process work, so a refusal costs the host nothing.
//!
//! [`ProcessSource`]: crate::source::ProcessSource

use super::HostState;
use super::HostStats;
use super::OverLimit;
use super::collector::api::processes::{Fields, Host, ProcessSample, SampleError};
use crate::source;

impl HostState {
    /// Why a sample is refused without enumerating, if it is.
    fn sample_refusal(&self) -> Option<String> {
        let limits = &self.services.limits;
        if self.call.samples >= limits.max_samples_per_call {
            Some(format!(
                "more than {} samples in one call",
                limits.max_samples_per_call
            ))
        } else if self.host_budget_spent() {
            Some(format!(
                "this call spent its host time budget of {:?}",
                limits.host_budget
            ))
        } else {
            None
        }
    }
}

impl Host for HostState {
    fn sample(&mut self, fields: Fields) -> Result<ProcessSample, SampleError> {
        if let Some(why) = self.sample_refusal() {
            HostStats::bump(&self.services.stats.samples_refused, 1);
            if self.logger.admit_warning() {
                tracing::warn!(guest = %self.guest_name, "sample refused: {why}");
            }
            return Err(SampleError::Failed(why));
        }
        let wanted = source::Fields {
            cpu: fields.contains(Fields::CPU),
            memory: fields.contains(Fields::MEMORY),
            disk: fields.contains(Fields::DISK),
        };
        self.call.samples += 1;
        let table = self.host_work(|s| s.services.processes.sample(wanted));
        let stats = &self.services.stats;
        HostStats::bump(&stats.samples, 1);
        let table = table.map_err(|e| {
            if self.logger.admit_warning() {
                tracing::warn!(guest = %self.guest_name, error = %e, "process sampling failed");
            }
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

    fn names(&mut self, pids: Vec<u32>) -> wasmtime::Result<Vec<String>> {
        let limit = self.services.limits.max_names_per_call;
        if pids.len() > limit {
            return Err(wasmtime::Error::new(OverLimit {
                call: "names",
                what: "PIDs",
                asked: pids.len(),
                limit,
            }));
        }
        HostStats::bump(&self.services.stats.name_calls, 1);
        if self.host_budget_spent() {
            // Unknown names are empty strings: the answer the WIT gives for exited
            // processes, cheap to make and to lower.
            return Ok(vec![String::new(); pids.len()]);
        }
        let names = self.host_work(|s| s.services.processes.names(&pids));
        HostStats::bump(&self.services.stats.names_looked_up, names.len() as u64);
        Ok(names)
    }
}
