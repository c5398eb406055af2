//! `collector:api/publish`: guest messages to the sink, only on granted subjects and
//! within size and per-call limits. Every refusal is logged and counted.

use super::collector::api::publish::{Host, PublishError};
use super::{HostState, HostStats};

impl Host for HostState {
    fn publish(&mut self, subject: String, payload: Vec<u8>) -> Result<(), PublishError> {
        let stats = &self.services.stats;
        let guest = &*self.guest_name;
        if !self.services.grant.allows(&subject) {
            HostStats::bump(&stats.publish_denied, 1);
            tracing::warn!(guest, subject, grant = %self.services.grant, "publish refused: subject not granted");
            return Err(PublishError::NotGranted);
        }
        let limits = &self.services.limits;
        if payload.len() > limits.max_payload_bytes {
            HostStats::bump(&stats.publish_limited, 1);
            tracing::warn!(
                guest,
                subject,
                bytes = payload.len(),
                limit = limits.max_payload_bytes,
                "publish refused: payload too large"
            );
            return Err(PublishError::TooLarge(
                u32::try_from(limits.max_payload_bytes).unwrap_or(u32::MAX),
            ));
        }
        if self.call.publishes >= limits.max_publishes_per_call {
            HostStats::bump(&stats.publish_limited, 1);
            tracing::warn!(
                guest,
                subject,
                limit = limits.max_publishes_per_call,
                "publish refused: too many publishes in one call"
            );
            return Err(PublishError::RateLimited);
        }
        self.call.publishes += 1;
        let sent = self.host_work(|s| s.services.sink.publish(&subject, &payload));
        let stats = &self.services.stats;
        match sent {
            Ok(()) => {
                HostStats::bump(&stats.published, 1);
                tracing::debug!(guest = %self.guest_name, subject, bytes = payload.len(), "published");
                Ok(())
            }
            Err(e) => {
                HostStats::bump(&stats.publish_failed, 1);
                tracing::warn!(guest = %self.guest_name, subject, error = %e, "publish failed");
                Err(PublishError::Failed(e.to_string()))
            }
        }
    }
}
