//! Where published messages go: standard output (one message per line) or core NATS.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Why a sink did not take a message.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// Writing the line to standard output failed (a closed pipe, a full disk).
    #[error("write to standard output failed: {0}")]
    Stdout(#[from] std::io::Error),
    /// The NATS client refused the publish; its message. [`MemorySink`] fails this
    /// way while set failing.
    #[error("NATS publish failed: {0}")]
    Nats(String),
    /// The NATS publish did not complete within the sink's timeout (given).
    #[error("NATS publish timed out after {0:?}")]
    Timeout(Duration),
    /// The sink cannot take messages now (for a NATS sink: not connected), so the
    /// message was not attempted.
    #[error("sink unavailable: {0}")]
    Unavailable(String),
}

/// A destination for guest publishes. Called from the guest's thread, synchronously.
pub trait Sink: Send + Sync {
    /// Sends one message.
    ///
    /// # Errors
    ///
    /// When the message could not be handed over; it is then lost.
    fn publish(&self, subject: &str, payload: &[u8]) -> Result<(), SinkError>;

    /// Waits until accepted messages have left the process (best effort).
    fn flush(&self) {}
}

/// One payload per line on standard output; logs go to standard error, so the output
/// can be piped straight into `jq` or a file.
pub struct StdoutSink;

impl Sink for StdoutSink {
    fn publish(&self, _subject: &str, payload: &[u8]) -> Result<(), SinkError> {
        let mut out = std::io::stdout().lock();
        out.write_all(payload)?;
        out.write_all(b"\n")?;
        out.flush()?;
        Ok(())
    }
}

/// A published message: subject and payload.
pub type Message = (String, Vec<u8>);

/// Keeps every publish in memory: for tests, the mock host and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    messages: Arc<Mutex<Vec<Message>>>,
    failing: Arc<AtomicBool>,
}

impl MemorySink {
    /// While set, every publish fails as a broker outage would.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Takes every message published so far.
    pub fn take(&self) -> Vec<Message> {
        std::mem::take(&mut *self.messages.lock().expect("sink lock"))
    }

    /// How many messages are waiting to be taken.
    pub fn len(&self) -> usize {
        self.messages.lock().expect("sink lock").len()
    }

    /// Whether no message is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Sink for MemorySink {
    fn publish(&self, subject: &str, payload: &[u8]) -> Result<(), SinkError> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(SinkError::Nats(
                "simulated outage: no server available".into(),
            ));
        }
        self.messages
            .lock()
            .expect("sink lock")
            .push((subject.to_string(), payload.to_vec()));
        Ok(())
    }
}
