//! kanade's scope grammar, shared by every layered bucket (`agent_config` for settings,
//! `collector_config` for module assignments): keys `global`, `groups.<name>` and
//! `pcs.<pc_id>`, resolved global → groups (alphabetical, last wins) → pc. Pure: the
//! NATS glue lives in `watch.rs`.

use std::collections::BTreeMap;

/// Key of the fleet-wide layer.
pub const GLOBAL_KEY: &str = "global";
const GROUP_PREFIX: &str = "groups.";
const PC_PREFIX: &str = "pcs.";

/// Which layer a key of a layered bucket names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope<'a> {
    /// `global`: the layer every PC reads.
    Global,
    /// `groups.<name>`: the layer of the named group.
    Group(&'a str),
    /// `pcs.<pc_id>`: the layer of the PC with that id.
    Pc(&'a str),
}

impl<'a> Scope<'a> {
    /// Reads a bucket key; `None` for keys outside the grammar.
    pub fn parse(key: &'a str) -> Option<Self> {
        if key == GLOBAL_KEY {
            Some(Scope::Global)
        } else if let Some(group) = key.strip_prefix(GROUP_PREFIX) {
            (!group.is_empty()).then_some(Scope::Group(group))
        } else if let Some(pc) = key.strip_prefix(PC_PREFIX) {
            (!pc.is_empty()).then_some(Scope::Pc(pc))
        } else {
            None
        }
    }

    /// The bucket key of this scope.
    pub fn key(&self) -> String {
        match self {
            Scope::Global => GLOBAL_KEY.to_string(),
            Scope::Group(g) => format!("{GROUP_PREFIX}{g}"),
            Scope::Pc(pc) => format!("{PC_PREFIX}{pc}"),
        }
    }
}

impl std::fmt::Display for Scope<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.key())
    }
}

/// The keys that resolve into one PC's value: `global`, its own `pcs.<pc_id>` and
/// `groups.<g>` for each of its groups. Sorted, so two sets compare equal when they
/// watch the same keys.
pub fn keys_for(pc_id: &str, groups: &[String]) -> Vec<String> {
    let mut keys = vec![Scope::Global.key(), Scope::Pc(pc_id).key()];
    keys.extend(groups.iter().map(|g| Scope::Group(g).key()));
    keys.sort();
    keys.dedup();
    keys
}

/// The layers of one bucket that apply to one PC, with the revision each was read at.
#[derive(Debug, Clone, PartialEq)]
pub struct Layers<T> {
    /// The `global` layer; `None` when absent or deleted.
    pub global: Option<T>,
    /// Every group layer read, by group name, whether or not the PC is a member (see
    /// [`Layers::groups_of`]).
    pub groups: BTreeMap<String, T>,
    /// The PC's own `pcs.<pc_id>` layer; `None` when absent or deleted.
    pub pc: Option<T>,
    /// Last revision applied per key, so that entries a watch replays are ignored.
    revisions: BTreeMap<String, u64>,
}

impl<T> Default for Layers<T> {
    fn default() -> Self {
        Self {
            global: None,
            groups: BTreeMap::new(),
            pc: None,
            revisions: BTreeMap::new(),
        }
    }
}

/// What applying one bucket entry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// A layer changed: resolve again.
    Changed,
    /// Nothing changed: a replayed revision, another PC's key, or the same value.
    Unchanged,
}

impl<T: PartialEq> Layers<T> {
    /// Applies the entry of `key` at `revision`: `Some(value)` for a put, `None` for a
    /// delete or purge (the layer is cleared). Keys of other PCs, keys outside the
    /// grammar and revisions at or below the last applied one for the key change nothing.
    pub fn apply(&mut self, pc_id: &str, key: &str, revision: u64, value: Option<T>) -> Applied {
        let Some(scope) = Scope::parse(key) else {
            return Applied::Unchanged;
        };
        if matches!(scope, Scope::Pc(pc) if pc != pc_id) {
            return Applied::Unchanged;
        }
        if revision != 0 && revision <= self.revisions.get(key).copied().unwrap_or(0) {
            return Applied::Unchanged;
        }
        if revision != 0 {
            self.revisions.insert(key.to_string(), revision);
        }
        let slot_changed = match scope {
            Scope::Global => replace(&mut self.global, value),
            Scope::Pc(_) => replace(&mut self.pc, value),
            Scope::Group(g) => {
                let old = match value {
                    Some(v) => self.groups.insert(g.to_string(), v),
                    None => self.groups.remove(g),
                };
                old.as_ref() != self.groups.get(g)
            }
        };
        if slot_changed {
            Applied::Changed
        } else {
            Applied::Unchanged
        }
    }

    /// The highest revision applied to any key (0 when nothing was read).
    pub fn revision(&self) -> u64 {
        self.revisions.values().copied().max().unwrap_or(0)
    }

    /// Forgets the revision marks (a new watch must be able to re-apply every key).
    pub fn forget_revisions(&mut self) {
        self.revisions.clear();
    }

    /// The group layers of `groups` that exist, in resolution order (alphabetical).
    pub fn groups_of<'a>(&'a self, groups: &'a [String]) -> Vec<(&'a str, &'a T)> {
        let mut out: Vec<(&str, &T)> = groups
            .iter()
            .filter_map(|g| self.groups.get(g).map(|v| (g.as_str(), v)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

fn replace<T: PartialEq>(slot: &mut Option<T>, value: Option<T>) -> bool {
    let changed = *slot != value;
    *slot = value;
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_kanade_grammar() {
        assert_eq!(Scope::parse("global"), Some(Scope::Global));
        assert_eq!(Scope::parse("groups.canary"), Some(Scope::Group("canary")));
        assert_eq!(Scope::parse("pcs.pc-a"), Some(Scope::Pc("pc-a")));
        assert_eq!(Scope::parse("groups."), None);
        assert_eq!(Scope::parse("other"), None);
        assert_eq!(Scope::Group("zeta").key(), "groups.zeta");
        assert_eq!(
            keys_for("pc-a", &["zeta".into(), "alpha".into()]),
            ["global", "groups.alpha", "groups.zeta", "pcs.pc-a"]
        );
    }

    #[test]
    fn replayed_revisions_and_other_pcs_change_nothing() {
        let mut layers = Layers::default();
        assert_eq!(layers.apply("pc-a", "global", 5, Some(1)), Applied::Changed);
        assert_eq!(
            layers.apply("pc-a", "global", 5, Some(2)),
            Applied::Unchanged
        );
        assert_eq!(
            layers.apply("pc-a", "global", 4, Some(3)),
            Applied::Unchanged
        );
        assert_eq!(layers.global, Some(1));
        assert_eq!(
            layers.apply("pc-a", "pcs.pc-b", 9, Some(7)),
            Applied::Unchanged
        );
        assert_eq!(layers.pc, None);
        assert_eq!(
            layers.apply("pc-a", "global", 6, Some(1)),
            Applied::Unchanged
        );
        assert_eq!(layers.revision(), 6);
    }

    #[test]
    fn a_delete_clears_its_layer() {
        let mut layers = Layers::default();
        layers.apply("pc-a", "groups.canary", 1, Some(1));
        layers.apply("pc-a", "pcs.pc-a", 2, Some(2));
        assert_eq!(
            layers.apply("pc-a", "groups.canary", 3, None),
            Applied::Changed
        );
        assert_eq!(layers.apply("pc-a", "pcs.pc-a", 4, None), Applied::Changed);
        assert!(layers.groups.is_empty() && layers.pc.is_none());
        assert_eq!(
            layers.apply("pc-a", "pcs.pc-a", 5, None),
            Applied::Unchanged
        );
    }

    #[test]
    fn groups_resolve_alphabetically_and_only_memberships_count() {
        let mut layers = Layers::default();
        layers.apply("pc-a", "groups.zeta", 1, Some('z'));
        layers.apply("pc-a", "groups.alpha", 2, Some('a'));
        layers.apply("pc-a", "groups.other", 3, Some('o'));
        let mine = [
            "zeta".to_string(),
            "alpha".to_string(),
            "missing".to_string(),
        ];
        assert_eq!(layers.groups_of(&mine), [("alpha", &'a'), ("zeta", &'z')]);
    }
}
