//! `collector:api/publish`: guest messages to the sink, only on granted subjects and
//! within size and per-call limits. Every refusal is counted; refusals are logged within
//! the guest's per-call log budget (a guest could otherwise provoke a warning per call in
//! a loop), and the subject in them is quoted. A subject's length is checked first, so an
//! oversize one is never matched, copied or formatted.

use super::collector::api::publish::{Host, PublishError};
use super::log::{MAX_QUOTED_BYTES, quote};
use super::{HostState, HostStats};

impl HostState {
    /// Logs a refused publish, if the guest's log budget allows.
    fn refused(&self, subject: &str, why: &str) {
        if self.logger.admit_warning() {
            tracing::warn!(
                guest = %self.guest_name,
                subject = %quote(subject, MAX_QUOTED_BYTES),
                "publish refused: {why}"
            );
        }
    }
}

impl Host for HostState {
    fn publish(&mut self, subject: String, payload: Vec<u8>) -> Result<(), PublishError> {
        self.publish_checked(&subject, &payload)
    }
}

impl super::v0_2::collector::api::publish::Host for HostState {
    fn publish(
        &mut self,
        subject: String,
        payload: Vec<u8>,
    ) -> Result<(), super::v0_2::collector::api::publish::PublishError> {
        use super::v0_2::collector::api::publish::PublishError as V2;
        self.publish_checked(&subject, &payload)
            .map_err(|e| match e {
                PublishError::NotGranted => V2::NotGranted,
                PublishError::TooLarge(limit) => V2::TooLarge(limit),
                PublishError::RateLimited => V2::RateLimited,
                PublishError::Failed(why) => V2::Failed(why),
            })
    }
}

impl HostState {
    /// The body of `publish`, whatever the version of the interface.
    fn publish_checked(&mut self, subject: &str, payload: &[u8]) -> Result<(), PublishError> {
        let limits = &self.services.limits;
        let stats = &self.services.stats;
        if subject.len() > limits.max_subject_bytes {
            HostStats::bump(&stats.publish_denied, 1);
            let why = format!(
                "subject of {} bytes, longer than the {} allowed",
                subject.len(),
                limits.max_subject_bytes
            );
            self.refused(subject, &why);
            return Err(PublishError::NotGranted);
        }
        if !self.services.grant.allows(subject) {
            HostStats::bump(&stats.publish_denied, 1);
            let why = format!("subject not granted (grant: {})", self.services.grant);
            self.refused(subject, &why);
            return Err(PublishError::NotGranted);
        }
        if payload.len() > limits.max_payload_bytes {
            HostStats::bump(&stats.publish_limited, 1);
            let why = format!(
                "payload of {} bytes, over the limit of {}",
                payload.len(),
                limits.max_payload_bytes
            );
            self.refused(subject, &why);
            return Err(PublishError::TooLarge(
                u32::try_from(limits.max_payload_bytes).unwrap_or(u32::MAX),
            ));
        }
        if self.call.publishes >= limits.max_publishes_per_call {
            HostStats::bump(&stats.publish_limited, 1);
            let why = format!(
                "more than {} publishes in one call",
                limits.max_publishes_per_call
            );
            self.refused(subject, &why);
            return Err(PublishError::RateLimited);
        }
        if self.host_budget_spent() {
            HostStats::bump(&stats.publish_limited, 1);
            let why = format!(
                "this call spent its host time budget of {:?}",
                limits.host_budget
            );
            self.refused(subject, &why);
            return Err(PublishError::RateLimited);
        }
        self.call.publishes += 1;
        let sent = self.host_work(|s| s.services.sink.publish(subject, payload));
        let stats = &self.services.stats;
        match sent {
            Ok(()) => {
                HostStats::bump(&stats.published, 1);
                HostStats::bump(&stats.published_bytes, payload.len() as u64);
                tracing::debug!(guest = %self.guest_name, subject, bytes = payload.len(), "published");
                Ok(())
            }
            Err(e) => {
                HostStats::bump(&stats.publish_failed, 1);
                if self.logger.admit_warning() {
                    tracing::warn!(guest = %self.guest_name, subject, error = %e, "publish failed");
                }
                Err(PublishError::Failed(e.to_string()))
            }
        }
    }
}
