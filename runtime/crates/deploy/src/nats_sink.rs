//! Core NATS publishes for guests: the agent's sink when it runs with a NATS URL. Kept
//! out of the sandbox crate so that the sandbox (and the testkit above it) never depends
//! on a NATS client.

use std::time::Duration;

use collector_sandbox::sink::{Sink, SinkError};

/// Core NATS publishes (not JetStream), as the kanade backend subscribes to them.
pub struct NatsSink {
    client: async_nats::Client,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
}

impl NatsSink {
    /// Publishes through an existing client (which may still be connecting).
    pub fn new(
        client: async_nats::Client,
        runtime: tokio::runtime::Handle,
        timeout: Duration,
    ) -> Self {
        Self {
            client,
            runtime,
            timeout,
        }
    }
}

impl Sink for NatsSink {
    fn publish(&self, subject: &str, payload: &[u8]) -> Result<(), SinkError> {
        // While the server is away a publish fails at once (and is counted) instead of
        // filling the client's buffer and then waiting out the timeout on every tick.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(SinkError::Unavailable("not connected to NATS".into()));
        }
        let client = self.client.clone();
        let subject = subject.to_string();
        let payload = payload.to_vec().into();
        self.runtime.block_on(async {
            match tokio::time::timeout(self.timeout, client.publish(subject, payload)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(SinkError::Nats(e.to_string())),
                Err(_) => Err(SinkError::Timeout(self.timeout)),
            }
        })
    }

    fn flush(&self) {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return;
        }
        let client = self.client.clone();
        let _ = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, client.flush()).await });
    }
}
