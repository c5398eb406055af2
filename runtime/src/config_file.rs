//! `--config FILE`: a JSON `ConfigScope` (what an operator stores in the `agent_config`
//! KV) layered over the built-in defaults, re-read when it changes. A bad edit is
//! reported with the file and field, and the last good configuration stays in force.

use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Duration;

use collector_shared::config::resolve;
use collector_shared::{ConfigError, ConfigScope, EffectiveConfig};

use crate::agent::ConfigTarget;
use crate::fsutil::{Links, ReadProblem, read_regular};

/// Largest config file read, in bytes (1 MiB). A config scope is a few hundred bytes.
pub const MAX_CONFIG_FILE_LEN: u64 = 1024 * 1024;

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("config file {path}: {problem}")]
    Read { path: String, problem: ReadProblem },
    #[error("config file {path}: it is not UTF-8 text")]
    NotText { path: String },
    #[error("config file {path}: {error}")]
    Invalid { path: String, error: ConfigError },
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
pub fn watch(
    path: PathBuf,
    mut last_text: String,
    agent: impl ConfigTarget,
    poll: Duration,
) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || {
            let mut last_error: Option<String> = None;
            loop {
                std::thread::sleep(poll);
                if !agent.is_running() {
                    return;
                }
                let text = match read_text(&path) {
                    Ok(text) => text,
                    Err(e) => {
                        report_once(&mut last_error, e.to_string());
                        continue;
                    }
                };
                if text == last_text {
                    continue;
                }
                match parse(&path, &text) {
                    Ok(config) => {
                        tracing::info!(file = %path.display(), "config file changed; applying it");
                        last_error = None;
                        last_text = text;
                        agent.configure(config);
                    }
                    Err(e) => report_once(&mut last_error, e.to_string()),
                }
            }
        })
        .expect("spawn the config watcher thread")
}

/// Logs an error once until it changes, so a broken file does not flood the log.
fn report_once(last: &mut Option<String>, message: String) {
    if last.as_deref() != Some(message.as_str()) {
        tracing::error!("{message}; keeping the last good configuration");
        *last = Some(message);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        use crate::fsutil::hostile;
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
