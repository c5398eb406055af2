//! Matching a published JSON document against an expected subset, with a float
//! tolerance, and describing every difference by its path so a failure reads like a diff.
//!
//! Rules: every key of an expected object must match (extra actual keys are fine, unless
//! `exact_keys` is set); the string `"$absent"` requires the key to be missing and `"$any"`
//! accepts any value; arrays must have the same length and match element by element, in
//! order when `ordered` is set, otherwise in any order; numbers match within `tolerance`
//! or within `relative_tolerance` of the expected value, whichever is looser.

use serde_json::Value;

/// Placeholder requiring a key to be absent.
pub const ABSENT: &str = "$absent";
/// Placeholder accepting any value.
pub const ANY: &str = "$any";

/// How loosely to compare.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MatchOptions {
    /// Largest absolute difference between two numbers that still match.
    pub tolerance: f64,
    /// Largest difference between two numbers that still match, as a fraction of the
    /// expected number's magnitude (0.01: within 1%). 0 turns it off.
    pub relative_tolerance: f64,
    /// Whether arrays must match in order.
    pub ordered: bool,
    /// Whether an actual object may hold only the keys its pattern names.
    pub exact_keys: bool,
}

impl Default for MatchOptions {
    fn default() -> Self {
        Self {
            tolerance: 1e-6,
            relative_tolerance: 0.0,
            ordered: false,
            exact_keys: false,
        }
    }
}

impl MatchOptions {
    /// Whether `actual` is close enough to `expected`.
    fn numbers_match(&self, expected: f64, actual: f64) -> bool {
        if expected.is_nan() || actual.is_nan() {
            return expected.is_nan() && actual.is_nan();
        }
        let allowed = self.tolerance.max(self.relative_tolerance * expected.abs());
        (expected - actual).abs() <= allowed
    }
}

/// One difference between expected and actual.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// Where, such as `processes[0].pid` (empty for the root).
    pub path: String,
    /// What the pattern asks for there: shortened JSON, or a description such as
    /// `no such key`.
    pub expected: String,
    /// What the document holds there, in the same form.
    pub actual: String,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = if self.path.is_empty() {
            "(root)"
        } else {
            &self.path
        };
        write!(
            f,
            "at {path}: expected {}, got {}",
            self.expected, self.actual
        )
    }
}

/// Every difference between `expected` (a subset pattern) and `actual`.
pub fn mismatches(expected: &Value, actual: &Value, options: MatchOptions) -> Vec<Mismatch> {
    let mut out = Vec::new();
    compare(expected, actual, options, String::new(), &mut out);
    out
}

fn compare(
    expected: &Value,
    actual: &Value,
    o: MatchOptions,
    path: String,
    out: &mut Vec<Mismatch>,
) {
    let mut differ = |e: String, a: String| {
        out.push(Mismatch {
            path: path.clone(),
            expected: e,
            actual: a,
        })
    };
    match (expected, actual) {
        (Value::String(s), _) if s == ANY => {}
        (Value::Object(e), Value::Object(a)) => {
            for (key, ev) in e {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match (ev, a.get(key)) {
                    (Value::String(s), None) if s == ABSENT => {}
                    (Value::String(s), Some(av)) if s == ABSENT => out.push(Mismatch {
                        path: child,
                        expected: "no such key".into(),
                        actual: short(av),
                    }),
                    (_, None) => out.push(Mismatch {
                        path: child,
                        expected: short(ev),
                        actual: "no such key".into(),
                    }),
                    (_, Some(av)) => compare(ev, av, o, child, out),
                }
            }
            if o.exact_keys {
                for (key, av) in a.iter().filter(|(k, _)| !e.contains_key(*k)) {
                    out.push(Mismatch {
                        path: if path.is_empty() {
                            key.clone()
                        } else {
                            format!("{path}.{key}")
                        },
                        expected: "no such key (exact_keys: the pattern does not name it)".into(),
                        actual: short(av),
                    });
                }
            }
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                differ(
                    format!("{} elements", e.len()),
                    format!("{} elements: {}", a.len(), short(actual)),
                );
            } else if o.ordered {
                for (i, (ev, av)) in e.iter().zip(a).enumerate() {
                    compare(ev, av, o, format!("{path}[{i}]"), out);
                }
            } else {
                // A maximum matching, so a loose pattern cannot steal the only element a
                // stricter one could match.
                let fits: Vec<Vec<bool>> = e
                    .iter()
                    .map(|ev| {
                        a.iter()
                            .map(|av| mismatches(ev, av, o).is_empty())
                            .collect()
                    })
                    .collect();
                let mut owner: Vec<Option<usize>> = vec![None; a.len()];
                for (i, ev) in e.iter().enumerate() {
                    let mut seen = vec![false; a.len()];
                    if !assign(i, &fits, &mut seen, &mut owner) {
                        out.push(Mismatch {
                            path: format!("{path}[{i}]"),
                            expected: short(ev),
                            actual: "no matching element (arrays compared in any order)".into(),
                        });
                    }
                }
            }
        }
        (Value::Number(e), Value::Number(a)) => {
            let (e, a) = (
                e.as_f64().unwrap_or(f64::NAN),
                a.as_f64().unwrap_or(f64::NAN),
            );
            if !o.numbers_match(e, a) {
                differ(e.to_string(), a.to_string());
            }
        }
        (e, a) if e == a => {}
        (e, a) => differ(short(e), short(a)),
    }
}

/// Finds an actual element for expected element `i`, moving earlier assignments along
/// augmenting paths when needed (Kuhn's algorithm).
fn assign(i: usize, fits: &[Vec<bool>], seen: &mut [bool], owner: &mut [Option<usize>]) -> bool {
    for j in 0..owner.len() {
        if fits[i][j] && !seen[j] {
            seen[j] = true;
            if owner[j].is_none_or(|k| assign(k, fits, seen, owner)) {
                owner[j] = Some(i);
                return true;
            }
        }
    }
    false
}

/// A value as compact JSON, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 120 {
        let cut: String = s.chars().take(117).collect();
        format!("{cut}...")
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(expected: Value, actual: Value, ordered: bool) -> Vec<String> {
        let o = MatchOptions {
            ordered,
            ..Default::default()
        };
        mismatches(&expected, &actual, o)
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn subset_of_objects_with_absent_and_any() {
        let actual = json!({"pid": 1, "name": "x", "cpu_pct": 2.0000001});
        assert!(
            check(
                json!({"pid": 1, "cpu_pct": 2.0, "rate": ABSENT, "name": ANY}),
                actual.clone(),
                false
            )
            .is_empty()
        );
        assert_eq!(
            check(json!({"name": ABSENT, "pid": 2}), actual, false),
            vec![
                "at name: expected no such key, got \"x\"".to_string(),
                "at pid: expected 2, got 1".to_string()
            ]
        );
    }

    #[test]
    fn arrays_need_equal_length_and_order_only_when_asked() {
        let actual = json!([{"pid": 1}, {"pid": 2}]);
        assert!(check(json!([{"pid": 2}, {"pid": 1}]), actual.clone(), false).is_empty());
        assert_eq!(
            check(json!([{"pid": 2}, {"pid": 1}]), actual.clone(), true),
            vec![
                "at [0].pid: expected 2, got 1",
                "at [1].pid: expected 1, got 2"
            ]
        );
        let e = check(json!([{"pid": 1}]), actual, false);
        assert!(
            e[0].starts_with("at (root): expected 1 elements, got 2 elements"),
            "{e:?}"
        );
    }

    #[test]
    fn unordered_matching_finds_an_assignment_when_one_exists() {
        let actual = json!([{"pid": 2}, {"pid": 1}]);
        assert!(check(json!([{"pid": ANY}, {"pid": 2}]), actual.clone(), false).is_empty());
        assert_eq!(
            check(json!([{"pid": 2}, {"pid": 2}]), actual, false).len(),
            1
        );
    }

    #[test]
    fn relative_tolerance_scales_with_the_expected_number() {
        let o = MatchOptions {
            relative_tolerance: 0.01,
            ..Default::default()
        };
        let check = |e: Value, a: Value| mismatches(&e, &a, o);
        assert!(check(json!(1000.0), json!(1009.9)).is_empty());
        assert!(check(json!(1000.0), json!(990.1)).is_empty());
        assert_eq!(
            check(json!({"rate": 1000.0}), json!({"rate": 1010.5}))[0].to_string(),
            "at rate: expected 1000, got 1010.5"
        );
        // Near zero the absolute tolerance still applies.
        assert!(check(json!(0.0), json!(0.0000005)).is_empty());
        assert_eq!(check(json!(0.0), json!(0.001)).len(), 1);
    }

    #[test]
    fn exact_keys_reports_every_key_the_pattern_does_not_name() {
        let o = MatchOptions {
            exact_keys: true,
            ..Default::default()
        };
        let actual = json!({"pid": 1, "name": "x", "extra": [1], "nested": {"a": 1, "b": 2}});
        let found: Vec<String> = mismatches(
            &json!({"pid": 1, "name": ANY, "gone": ABSENT, "nested": {"a": 1}}),
            &actual,
            o,
        )
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            found,
            vec![
                "at nested.b: expected no such key (exact_keys: the pattern does not name it), got 2",
                "at extra: expected no such key (exact_keys: the pattern does not name it), got [1]",
            ]
        );
        assert!(
            mismatches(
                &json!({"pid": 1, "name": "x", "extra": ANY, "nested": ANY}),
                &actual,
                o
            )
            .is_empty(),
            "\"$any\" accepts a whole subtree"
        );
    }

    #[test]
    fn numbers_respect_the_tolerance_and_types_must_agree() {
        assert!(check(json!(1.0), json!(1.0000005), false).is_empty());
        assert_eq!(check(json!(1.0), json!(1.1), false).len(), 1);
        assert_eq!(
            check(json!("1"), json!(1), false),
            vec!["at (root): expected \"1\", got 1"]
        );
        assert_eq!(
            check(json!({"a": {"b": 1}}), json!({"a": {}}), false),
            vec!["at a.b: expected 1, got no such key"]
        );
    }
}
