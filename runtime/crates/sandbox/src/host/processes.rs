//! `collector:api/processes` (0.1.0 and 0.2.0): enumeration through the configured
//! [`ProcessSource`], bounded per call: at most `max_samples_per_call` enumerations
//! (`sample` and `sample-pids` alike) and `max_names_per_call` PIDs per look-up or
//! per `sample-pids`, and nothing more once the call's host time budget is spent. The
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

impl HostState {
    /// The body of `sample` and `sample-pids`, whatever the version of the interface:
    /// the per-call checks, then the enumeration of everyone (`pids` is `None`) or of
    /// `pids`. Returns the table and whether its CPU figures were measured over a span.
    fn sample_table(
        &mut self,
        fields: source::Fields,
        pids: Option<&[u32]>,
    ) -> Result<(source::ProcessTable, bool), String> {
        let refusal = match pids {
            Some(pids) if pids.len() > self.services.limits.max_names_per_call => Some(format!(
                "{} PIDs asked in one sample, over the limit of {}",
                pids.len(),
                self.services.limits.max_names_per_call
            )),
            _ => self.sample_refusal(),
        };
        if let Some(why) = refusal {
            HostStats::bump(&self.services.stats.samples_refused, 1);
            if self.logger.admit_warning() {
                tracing::warn!(guest = %self.guest_name, "sample refused: {why}");
            }
            return Err(why);
        }
        self.call.samples += 1;
        let table = self.host_work(|s| match pids {
            None => s.services.processes.sample(fields),
            Some(pids) => s.services.processes.sample_pids(pids, fields),
        });
        let stats = &self.services.stats;
        HostStats::bump(
            if pids.is_some() {
                &stats.pid_samples
            } else {
                &stats.samples
            },
            1,
        );
        let table = table.inspect_err(|e| {
            if self.logger.admit_warning() {
                tracing::warn!(guest = %self.guest_name, error = %e, "process sampling failed");
            }
        })?;
        if pids.is_none() {
            HostStats::bump(&stats.processes_sampled, table.len() as u64);
        }
        tracing::trace!(guest = %self.guest_name, processes = table.len(), "sampled");
        let primed = !fields.cpu || pids.is_some() || self.services.processes.cpu_primed();
        Ok((table, primed))
    }

    /// The body of `names`, whatever the version of the interface.
    fn names_of(&mut self, pids: Vec<u32>) -> wasmtime::Result<Vec<String>> {
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

impl Host for HostState {
    fn sample(&mut self, fields: Fields) -> Result<ProcessSample, SampleError> {
        let wanted = source::Fields {
            cpu: fields.contains(Fields::CPU),
            memory: fields.contains(Fields::MEMORY),
            disk: fields.contains(Fields::DISK),
        };
        let (table, _) = self
            .sample_table(wanted, None)
            .map_err(SampleError::Failed)?;
        Ok(ProcessSample {
            pids: table.pids,
            cpu_pct: table.cpu_pct,
            rss_bytes: table.rss_bytes,
            disk_read_bytes: table.disk_read_bytes,
            disk_written_bytes: table.disk_written_bytes,
        })
    }

    fn names(&mut self, pids: Vec<u32>) -> wasmtime::Result<Vec<String>> {
        self.names_of(pids)
    }
}

/// `collector:api/processes@0.2.0`.
mod v0_2 {
    use super::super::v0_2::collector::api::processes::{Fields, Host, ProcessSample, SampleError};
    use crate::host::HostState;
    use crate::source;

    fn wanted(fields: Fields) -> source::Fields {
        source::Fields {
            cpu: fields.contains(Fields::CPU),
            memory: fields.contains(Fields::MEMORY),
            disk: fields.contains(Fields::DISK),
        }
    }

    fn lift((table, cpu_primed): (source::ProcessTable, bool)) -> ProcessSample {
        ProcessSample {
            pids: table.pids,
            cpu_pct: table.cpu_pct,
            rss_bytes: table.rss_bytes,
            disk_read_bytes: table.disk_read_bytes,
            disk_written_bytes: table.disk_written_bytes,
            cpu_primed,
        }
    }

    impl Host for HostState {
        fn sample(&mut self, fields: Fields) -> Result<ProcessSample, SampleError> {
            self.sample_table(wanted(fields), None)
                .map(lift)
                .map_err(SampleError::Failed)
        }

        fn sample_pids(
            &mut self,
            pids: Vec<u32>,
            fields: Fields,
        ) -> Result<ProcessSample, SampleError> {
            self.sample_table(wanted(fields), Some(&pids))
                .map(lift)
                .map_err(SampleError::Failed)
        }

        fn names(&mut self, pids: Vec<u32>) -> wasmtime::Result<Vec<String>> {
            self.names_of(pids)
        }
    }
}
