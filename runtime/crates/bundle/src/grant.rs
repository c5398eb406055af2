//! Which subjects a module may publish to. Patterns use NATS wildcards (`*` one token,
//! `>` one or more trailing tokens) and the placeholder `{pc_id}`, bound to this
//! machine's id when the module is loaded.

use std::fmt;

/// Placeholder replaced by the machine's id in grant patterns.
pub const PC_ID_PLACEHOLDER: &str = "{pc_id}";

/// The grant given to modules that do not carry their own: any subject of the form
/// `<name>.<this pc_id>`, which covers `process_perf.{pc_id}` and its siblings.
pub const DEFAULT_GRANT: &str = "*.{pc_id}";

/// A subject pattern that failed to parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid subject pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as written, before `{pc_id}` was bound.
    pub pattern: String,
    /// What is wrong with it, for people.
    pub reason: String,
}

/// A set of subject patterns with `{pc_id}` already bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    patterns: Vec<Vec<String>>,
}

/// Checks that `pc_id` can stand in a subject: one token, no wildcard, no space.
///
/// # Errors
///
/// A message saying what is wrong with it.
pub fn check_pc_id(pc_id: &str) -> Result<(), String> {
    if pc_id.is_empty() {
        return Err("it is empty".into());
    }
    if pc_id.len() > MAX_PC_ID {
        return Err(format!(
            "it is {} bytes long, over {MAX_PC_ID}",
            pc_id.len()
        ));
    }
    if let Some(c) = pc_id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_')))
    {
        return Err(format!(
            "it contains {c:?}; it must be a single NATS subject token that is also a KV key \
             (ASCII letters, digits, `-` and `_`)"
        ));
    }
    Ok(())
}

/// Longest PC id, in bytes.
pub const MAX_PC_ID: usize = 128;

impl Grant {
    /// A grant that allows nothing.
    pub fn none() -> Self {
        Self {
            patterns: Vec::new(),
        }
    }

    /// Binds `{pc_id}` in each pattern and checks its syntax.
    ///
    /// # Errors
    ///
    /// The first pattern that is not a valid NATS subject pattern.
    pub fn new<S: AsRef<str>>(patterns: &[S], pc_id: &str) -> Result<Self, PatternError> {
        if let Err(reason) = check_pc_id(pc_id)
            && patterns
                .iter()
                .any(|p| p.as_ref().contains(PC_ID_PLACEHOLDER))
        {
            return Err(PatternError {
                pattern: patterns
                    .iter()
                    .find(|p| p.as_ref().contains(PC_ID_PLACEHOLDER))
                    .map(|p| p.as_ref().to_string())
                    .unwrap_or_default(),
                reason: format!("the machine id cannot fill {{pc_id}}: {reason}"),
            });
        }
        let patterns = patterns
            .iter()
            .map(|p| {
                let pattern = p.as_ref().replace(PC_ID_PLACEHOLDER, pc_id);
                let tokens = tokens(&pattern).ok_or_else(|| PatternError {
                    pattern: p.as_ref().to_string(),
                    reason:
                        "expected dot-separated tokens without spaces, such as process_perf.{pc_id}"
                            .into(),
                })?;
                if let Some(i) = tokens.iter().position(|t| t == ">")
                    && i + 1 != tokens.len()
                {
                    return Err(PatternError {
                        pattern: p.as_ref().to_string(),
                        reason: "`>` may only be the last token".into(),
                    });
                }
                Ok(tokens)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { patterns })
    }

    /// Whether a publish to `subject` is allowed. Subjects holding wildcards are never
    /// allowed: NATS refuses to publish to them.
    ///
    /// Allocates nothing: the subject is a guest's, and may be as long as its memory.
    pub fn allows(&self, subject: &str) -> bool {
        let valid = subject
            .split('.')
            .all(|t| valid_token(t) && t != "*" && t != ">");
        let reserved = RESERVED_ROOTS
            .iter()
            .any(|root| subject.split('.').next() == Some(root));
        valid && !reserved && self.patterns.iter().any(|p| matches(p, subject.split('.')))
    }
}

impl fmt::Display for Grant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<String> = self.patterns.iter().map(|p| p.join(".")).collect();
        f.write_str(&shown.join(", "))
    }
}

/// First tokens no grant covers: `heartbeat.<pc_id>` is the kanade agent's liveness
/// signal, and a guest's publish there would make a dead agent look alive.
pub const RESERVED_ROOTS: &[&str] = &["heartbeat"];

fn valid_token(t: &str) -> bool {
    !t.is_empty() && !t.chars().any(|c| c.is_whitespace() || c.is_control())
}

fn tokens(pattern: &str) -> Option<Vec<String>> {
    let tokens: Vec<String> = pattern.split('.').map(str::to_string).collect();
    tokens.iter().all(|t| valid_token(t)).then_some(tokens)
}

fn matches<'a>(pattern: &[String], mut subject: impl Iterator<Item = &'a str>) -> bool {
    for p in pattern {
        match subject.next() {
            Some(_) if p == ">" => return true,
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_grant_covers_this_pc_only() {
        let g = Grant::new(&[DEFAULT_GRANT], "pc-1").unwrap();
        assert!(g.allows("process_perf.pc-1"));
        assert!(g.allows("host_perf.pc-1"));
        assert!(!g.allows("process_perf.pc-2"));
        assert!(!g.allows("process_perf.pc-1.extra"));
        assert!(!g.allows("pc-1"));
    }

    #[test]
    fn no_grant_covers_kanade_heartbeats() {
        let g = Grant::new(&[DEFAULT_GRANT, ">"], "pc-1").unwrap();
        assert!(g.allows("process_perf.pc-1"));
        assert!(!g.allows("heartbeat.pc-1"));
        assert!(!g.allows("heartbeat"));
        assert!(g.allows("heartbeats.pc-1"));
    }

    #[test]
    fn wildcards_follow_nats_rules() {
        let g = Grant::new(&["metrics.>", "a.*.c"], "x").unwrap();
        assert!(g.allows("metrics.cpu"));
        assert!(g.allows("metrics.cpu.total"));
        assert!(!g.allows("metrics"));
        assert!(g.allows("a.b.c"));
        assert!(!g.allows("a.b.d"));
        assert!(!g.allows("a.*.c"), "publishing to a wildcard is refused");
        assert!(!g.allows("a..c"));
        assert!(!g.allows("a.b c.c"));
    }

    #[test]
    fn a_pc_id_that_is_not_one_token_cannot_widen_a_grant() {
        for bad in ["", "a.b", ">", "*", "a b"] {
            assert!(check_pc_id(bad).is_err(), "{bad:?}");
            assert!(Grant::new(&[DEFAULT_GRANT], bad).is_err(), "{bad:?}");
        }
        assert!(check_pc_id("pc-01_x").is_ok());
        assert!(!Grant::none().allows("process_perf.x"));
    }

    #[test]
    fn bad_patterns_are_reported() {
        assert!(Grant::new(&["a.>.b"], "x").is_err());
        assert!(Grant::new(&["a..b"], "x").is_err());
        assert!(Grant::new(&[""], "x").is_err());
    }
}
