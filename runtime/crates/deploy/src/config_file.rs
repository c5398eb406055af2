//! `--config FILE`: a JSON `ConfigScope` (what an operator stores in the `agent_config`
//! KV) layered over the built-in defaults, re-read when it changes. A bad edit is
//! reported with the file and field, and the last good configuration stays in force.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use collector_shared::config::resolve;
use collector_shared::{ConfigError, ConfigScope, EffectiveConfig};

use collector_fsutil::{Links, ReadProblem, read_regular};
use collector_sandbox::agent::ConfigTarget;

/// Largest config file read, in bytes (1 MiB). A config scope is a few hundred bytes.
pub const MAX_CONFIG_FILE_LEN: u64 = 1024 * 1024;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    /// The file could not be opened or read, is not a regular file, or is larger than
    /// [`MAX_CONFIG_FILE_LEN`].
    #[error("config file {path}: {problem}")]
    Read {
        /// The file, as given.
        path: String,
        /// What went wrong.
        problem: ReadProblem,
    },
    /// The file's bytes are not UTF-8.
    #[error("config file {path}: it is not UTF-8 text")]
    NotText {
        /// The file, as given.
        path: String,
    },
    /// The text is not a valid config scope: not JSON of the expected shape, or a field
    /// with an invalid value.
    #[error("config file {path}: {error}")]
    Invalid {
        /// The file, as given.
        path: String,
        /// The problem, naming the field.
        error: ConfigError,
    },
}

/// Parses `text` (the content of `path`) into an effective configuration, warning about
/// unknown fields.
///
/// # Errors
///
/// [`ConfigFileError::Invalid`], naming the file and the field.
pub fn parse(path: &Path, text: &str) -> Result<EffectiveConfig, ConfigFileError> {
    let invalid = |error| ConfigFileError::Invalid {
        path: path.display().to_string(),
        error,
    };
    let (scope, unknown) = ConfigScope::from_json(text).map_err(invalid)?;
    scope.validate().map_err(invalid)?;
    for field in unknown {
        tracing::warn!(file = %path.display(), field, known = ?ConfigScope::FIELDS, "unknown config field ignored");
    }
    Ok(resolve(Some(&scope), [], None).config)
}

/// Reads the file's text: a link is followed (config files are often linked into
/// place), but it must end at a regular file of at most [`MAX_CONFIG_FILE_LEN`] bytes,
/// and the read never blocks, so neither startup nor the watcher can hang on it.
///
/// # Errors
///
/// When it cannot be read, is not a regular file, is too large or is not UTF-8.
fn read_text(path: &Path) -> Result<String, ConfigFileError> {
    let bytes = read_regular(path, MAX_CONFIG_FILE_LEN, Links::Follow).map_err(|e| {
        ConfigFileError::Read {
            path: path.display().to_string(),
            problem: e.problem,
        }
    })?;
    String::from_utf8(bytes).map_err(|_| ConfigFileError::NotText {
        path: path.display().to_string(),
    })
}

/// Reads and parses the file.
///
/// # Errors
///
/// When it cannot be read or is invalid.
pub fn load(path: &Path) -> Result<(EffectiveConfig, String), ConfigFileError> {
    let text = read_text(path)?;
    let config = parse(path, &text)?;
    Ok((config, text))
}

/// Polls the file every `poll` and sends each new valid configuration to the agent.
/// `last_text` is the content already applied. Stops when the agent is gone.
///
/// Editors and `echo > file` truncate a file before they write it, so a poll may read a
/// half-written file. A problem is therefore reported only when the next poll finds the
/// same problem: a file caught mid-write is read again, whole, before anyone is told it is
/// broken, while a valid edit applies on the first poll that sees it.
pub fn watch(
    path: PathBuf,
    mut last_text: String,
    agent: impl ConfigTarget,
    poll: Duration,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut problems = Problems::default();
            loop {
                std::thread::sleep(poll);
                if !agent.is_running() {
                    return;
                }
                let text = match read_text(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        problems.seen(e.to_string());
                        continue;
                    }
                };
                if text == last_text {
                    problems.clear();
                    continue;
                }
                match parse(&path, &text) {
                    Ok(config) => {
                        tracing::info!(file = %path.display(), "config file changed; applying it");
                        problems.clear();
                        last_text = text;
                        agent.configure(config);
                    }
                    Err(e) => problems.seen(e.to_string()),
                }
            }
        })
        .expect("spawn the config watcher thread")
}

/// What the watcher has found wrong with the file, so that a problem is logged once it has
/// lasted two polls, and then only once until it changes.
#[derive(Debug, Default)]
struct Problems {
    /// The problem of the previous poll, not yet confirmed by a second one.
    unconfirmed: Option<String>,
    /// The problem last logged.
    reported: Option<String>,
}

impl Problems {
    /// Records the problem of this poll; returns it when it is now to be logged.
    fn confirm(&mut self, message: String) -> Option<String> {
        if self.unconfirmed.as_deref() != Some(message.as_str()) {
            self.unconfirmed = Some(message);
            return None;
        }
        if self.reported.as_deref() == Some(message.as_str()) {
            return None;
        }
        self.reported = Some(message.clone());
        Some(message)
    }

    /// Logs the problem of this poll when it is confirmed and new.
    fn seen(&mut self, message: String) {
        if let Some(message) = self.confirm(message) {
            tracing::error!("{message}; keeping the last good configuration");
        }
    }

    /// The file is good again (applied, or back to what is applied).
    fn clear(&mut self) {
        *self = Self::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_is_logged_once_it_lasts_two_polls_and_then_once() {
        let mut p = Problems::default();
        // A file caught mid-write, then whole and valid: nothing to log.
        assert_eq!(p.confirm("empty".into()), None);
        p.clear();
        // A file caught mid-write, then whole and invalid: logged on the second look.
        assert_eq!(p.confirm("empty".into()), None);
        assert_eq!(p.confirm("top_n".into()), None);
        assert_eq!(p.confirm("top_n".into()).as_deref(), Some("top_n"));
        assert_eq!(p.confirm("top_n".into()), None, "logged once");
        // Another problem that lasts is logged too; a good file starts afresh.
        assert_eq!(p.confirm("other".into()), None);
        assert_eq!(p.confirm("other".into()).as_deref(), Some("other"));
        p.clear();
        assert_eq!(p.confirm("other".into()), None);
        assert_eq!(p.confirm("other".into()).as_deref(), Some("other"));
    }

    #[test]
    fn scope_is_layered_over_defaults() {
        let cfg = parse(
            Path::new("c.json"),
            r#"{"process_perf_enabled":true,"host_perf_interval":"2s"}"#,
        )
        .unwrap();
        assert!(cfg.process_perf_enabled);
        assert_eq!(cfg.host_perf_interval, "2s");
        assert_eq!(cfg.process_perf_top_n, 20);
    }

    #[test]
    fn unparsable_durations_are_refused() {
        let err = parse(Path::new("c.json"), r#"{"host_perf_interval":"soon"}"#).unwrap_err();
        assert!(
            err.to_string().contains("field `host_perf_interval`"),
            "{err}"
        );
    }

    #[test]
    fn errors_name_file_and_field() {
        let err = parse(Path::new("/etc/c.json"), r#"{"process_perf_top_n":-1}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("config file /etc/c.json: field `process_perf_top_n`"),
            "{msg}"
        );
    }

    #[test]
    fn a_file_with_a_second_document_is_refused() {
        let err = parse(Path::new("c.json"), "{}\n{\"process_perf_enabled\": true}")
            .unwrap_err()
            .to_string();
        assert!(err.contains("c.json") && err.contains("trailing"), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn a_config_file_that_blocks_or_never_ends_is_an_error_at_once() {
        use collector_fsutil::hostile;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.json");
        hostile::each(&path, |what| {
            let p = path.clone();
            let err = hostile::promptly(what, move || load(&p).err())
                .unwrap_or_else(|| panic!("{what} accepted as a config file"));
            assert!(matches!(err, ConfigFileError::Read { .. }), "{what}: {err}");
            assert!(err.to_string().contains("agent.json"), "{what}: {err}");
        });
    }
}
