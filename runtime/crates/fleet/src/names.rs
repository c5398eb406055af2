//! The names the fleet uses in subjects, keys and file names, checked before anything
//! uses them: module names (object names, assignment keys, the state directory), group
//! names (KV keys, from kanade's free-form membership) and PC ids (subjects and keys).
//!
//! A name that passes is one NATS token or a dotted run of them, printable ASCII only, so
//! that it can neither widen a subject into a wildcard, nor walk a path, nor carry
//! terminal escapes or bidi overrides into a log line.

use std::fmt;

/// Longest module name (a bundle's limit): well inside NATS's 4 KiB control line once it
/// is part of a subject, with room for the rest of the request.
pub const MAX_MODULE_NAME: usize = collector_bundle::MAX_NAME_LEN;
/// Longest group name.
pub const MAX_GROUP_NAME: usize = 128;
/// Longest PC id.
pub const MAX_PC_ID: usize = collector_bundle::grant::MAX_PC_ID;

/// A name refused, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidName {
    /// What kind of name (`module name`, `group name`, `PC id`).
    pub what: &'static str,
    /// The name, escaped for display.
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

impl fmt::Display for InvalidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {}: {}", self.what, self.name, self.problem)
    }
}

impl std::error::Error for InvalidName {}

fn check(what: &'static str, name: &str, max: usize, allow_dots: bool) -> Result<(), InvalidName> {
    let fail = |problem: String| InvalidName {
        what,
        name: format!("{:?}", truncated(name)),
        problem,
    };
    if name.is_empty() {
        return Err(fail("empty".into()));
    }
    if name.len() > max {
        return Err(fail(format!(
            "{} bytes, over the limit of {max}",
            name.len()
        )));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(fail(format!(
            "holds {c:?}; allowed are ASCII letters, digits, `-`, `_`{}",
            if allow_dots { " and `.`" } else { "" }
        )));
    }
    if name.contains('.') {
        if !allow_dots {
            return Err(fail("holds `.`".into()));
        }
        if name.starts_with('.') || name.ends_with('.') || name.contains("..") {
            return Err(fail("an empty part between dots".into()));
        }
    }
    Ok(())
}

/// Text from a bucket or a subject made safe to print on a terminal, as one line: control
/// characters (escape sequences, newlines, carriage returns), bidi overrides and other
/// invisible format characters are written as `\u{..}` escapes (`\n`, `\r`, `\t` for
/// those), and a text over `max` characters is cut with `…`.
pub fn printable(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max * 2));
    for (i, c) in text.chars().enumerate() {
        if i == max {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() || is_invisible_format(c) => {
                out.push_str(&format!("\\u{{{:x}}}", u32::from(c)));
            }
            c => out.push(c),
        }
    }
    out
}

/// Bidi controls, zero-width and other format characters that change how a line reads
/// without showing themselves.
fn is_invisible_format(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD | 0x061C | 0x180E | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0xFEFF | 0xFFF9..=0xFFFB
    )
}

/// At most 80 characters of a name, for an error message.
fn truncated(name: &str) -> String {
    let mut out: String = name.chars().take(80).collect();
    if out.len() < name.len() {
        out.push('…');
    }
    out
}

/// Checks a module name: the rule of bundle manifests
/// ([`collector_bundle::check_module_name`]), so that a name an assignment
/// carries is one a bundle can have.
///
/// # Errors
///
/// [`InvalidName`] saying what is wrong.
pub fn module(name: &str) -> Result<(), InvalidName> {
    check("module name", name, MAX_MODULE_NAME, true)?;
    collector_bundle::check_module_name(name).map_err(|e| InvalidName {
        what: "module name",
        name: format!("{:?}", truncated(name)),
        problem: e.to_string(),
    })
}

/// Checks a group name, as [`module`] does, up to [`MAX_GROUP_NAME`] bytes.
///
/// # Errors
///
/// [`InvalidName`] saying what is wrong.
pub fn group(name: &str) -> Result<(), InvalidName> {
    check("group name", name, MAX_GROUP_NAME, true)
}

/// Checks a PC id: the agent's own rule ([`collector_bundle::grant::check_pc_id`]): one
/// subject token that is also a KV key, ASCII letters, digits, `-` and `_`, up to
/// [`MAX_PC_ID`] bytes.
///
/// # Errors
///
/// [`InvalidName`] saying what is wrong.
pub fn pc_id(name: &str) -> Result<(), InvalidName> {
    collector_bundle::grant::check_pc_id(name).map_err(|problem| InvalidName {
        what: "PC id",
        name: format!("{:?}", truncated(name)),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_could_walk_widen_or_escape_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            "a\0b",
            "a b",
            "a*",
            "a>",
            ".a",
            "a.",
            "a..b",
            "\u{202e}x",
            "\u{1b}[2J",
            "é",
        ] {
            assert!(module(bad).is_err(), "{bad:?} accepted");
            assert!(group(bad).is_err(), "{bad:?} accepted");
        }
        assert!(module(&"m".repeat(MAX_MODULE_NAME + 1)).is_err());
        assert!(module(&"m".repeat(3500)).unwrap_err().to_string().len() < 200);
        for good in ["process-perf", "top_memory", "a.b", "v2"] {
            module(good).unwrap();
            group(good).unwrap();
        }
        assert!(pc_id("a.b").is_err());
        pc_id("pc-a").unwrap();
    }

    #[test]
    fn printable_text_holds_no_escape_newline_or_bidi_override() {
        let hostile = "ok\u{1b}]0;owned\u{7}\u{1b}[2J\nforged row\r\u{202e}txt.exe\u{200b}";
        let shown = printable(hostile, 200);
        assert!(
            !shown
                .chars()
                .any(|c| c.is_control() || is_invisible_format(c)),
            "{shown}"
        );
        assert_eq!(
            shown,
            "ok\\u{1b}]0;owned\\u{7}\\u{1b}[2J\\nforged row\\r\\u{202e}txt.exe\\u{200b}"
        );
        assert_eq!(printable("héllo wörld", 5), "héllo…");
        assert_eq!(printable("plain", 5), "plain");
    }
}
