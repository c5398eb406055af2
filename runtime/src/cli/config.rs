//! `collector config`: edit and read kanade's layered settings bucket `agent_config` as
//! `kanade config set` does (the same bytes, the same compare-and-swap), resolve what one
//! PC ends up with, and manage group membership (`agent_groups`) for a fleet that runs
//! without kanade's backend.

use std::collections::BTreeSet;

use anyhow::{Context as _, anyhow, bail};
use chrono::{DateTime, SecondsFormat, Utc};
use clap::{Args, Subcommand};
use collector_shared::ConfigScope;
use collector_shared::config::resolve;
use serde_json::{Map, Value};

use super::ops::{self, NatsArgs, OptionalScope};
use collector_fleet::{AgentGroups, CONFIG_BUCKET, GROUPS_BUCKET, kv, names};
use collector_shared::scope::Scope;

/// kanade keeps one revision per key of its configuration buckets.
pub(super) const KANADE_HISTORY: i64 = 1;

/// Read and change the fleet's settings (kanade's `agent_config` KV).
///
/// Settings live in layers: `global`, `groups.<g>` for each group, `pcs.<pc>`; an agent
/// resolves built-in defaults, then global, then its groups in alphabetical order, then
/// its own PC layer. Values are written exactly as `kanade config set` writes them, so
/// kanade's backend, web UI and agents read them unchanged.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    Set(SetArgs),
    Unset(UnsetArgs),
    Get(GetArgs),
    Effective(EffectiveArgs),
    Groups(GroupsArgs),
}

/// Set fields of one layer (global unless --group or --pc).
///
/// Each FIELD=VALUE is checked before anything is written: durations need a unit
/// (`15s`, `1m 30s`; `15` is refused), `process_perf_expires_at` is an RFC 3339 time
/// (stored in UTC), `process_perf_enabled` is true or false, `process_perf_top_n` and
/// `max_local_concurrent` are integers (the latter at least 1). Other fields of the
/// layer are kept. The write is a compare-and-swap on the key's revision, retried when
/// another writer got there first.
///
/// Fields: max_local_concurrent, target_version, target_version_jitter,
/// heartbeat_interval, host_perf_interval, process_perf_enabled, process_perf_expires_at,
/// process_perf_top_n, client_display_name.
#[derive(Debug, Args)]
pub struct SetArgs {
    /// FIELD=VALUE pairs, for instance `process_perf_enabled=true host_perf_interval=15s`.
    #[arg(value_name = "FIELD=VALUE", required = true)]
    assignments: Vec<String>,

    #[command(flatten)]
    scope: OptionalScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Remove fields from one layer (global unless --group or --pc).
///
/// Wider layers (or the built-in defaults) apply again to those fields. A layer left with
/// no field stays as `{}` (it is not deleted), as kanade leaves it.
#[derive(Debug, Args)]
pub struct UnsetArgs {
    /// The fields to remove.
    #[arg(value_name = "FIELD", required = true)]
    fields: Vec<String>,

    #[command(flatten)]
    scope: OptionalScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Show one layer (global unless --group or --pc) as stored.
#[derive(Debug, Args)]
pub struct GetArgs {
    /// Print only the stored JSON value (`{}` when the layer does not exist).
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    scope: OptionalScope,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Show the configuration one PC resolves.
///
/// Prints its groups (from `agent_groups`), the layers that apply and their revisions,
/// the resulting settings as JSON, and the fields two of its groups set (the
/// alphabetically last group wins), as the agent resolves them.
#[derive(Debug, Args)]
pub struct EffectiveArgs {
    /// The PC.
    #[arg(long, value_name = "ID", required = true)]
    pc: String,

    /// Print only the resolved settings as JSON (conflicts go to standard error).
    #[arg(long)]
    json: bool,

    #[command(flatten)]
    nats: NatsArgs,
}

/// Show or set the groups a PC belongs to (kanade's `agent_groups` KV).
///
/// kanade manages these with `kanade group add|rm|set`; this command is for a fleet
/// without kanade's backend, and for tests. Membership is stored sorted and without
/// duplicates, as `{"groups":["alpha","zeta"]}`.
#[derive(Debug, Args)]
pub struct GroupsArgs {
    /// The PC.
    #[arg(long, value_name = "ID", required = true)]
    pc: String,

    /// Replace the PC's groups with these (comma-separated; empty for none).
    #[arg(long, value_name = "G,G...")]
    set: Option<String>,

    #[command(flatten)]
    nats: NatsArgs,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<()> {
    match args.command {
        ConfigCommand::Set(args) => set(args),
        ConfigCommand::Unset(args) => unset(args),
        ConfigCommand::Get(args) => get(args),
        ConfigCommand::Effective(args) => effective(args),
        ConfigCommand::Groups(args) => groups(args),
    }
}

/// How a field's text on the command line becomes its JSON value.
enum Kind {
    Bool,
    Integer { at_least: u64 },
    Timestamp,
    Text,
}

fn kind(field: &str) -> Kind {
    match field {
        "process_perf_enabled" => Kind::Bool,
        "max_local_concurrent" => Kind::Integer { at_least: 1 },
        "process_perf_top_n" => Kind::Integer { at_least: 0 },
        "process_perf_expires_at" => Kind::Timestamp,
        _ => Kind::Text,
    }
}

fn known_field<'a>(field: &'a str, given: &str) -> anyhow::Result<&'a str> {
    if ConfigScope::FIELDS.contains(&field) {
        Ok(field)
    } else {
        bail!(
            "{given}: unknown field {field:?}; known fields: {}",
            ConfigScope::FIELDS.join(", ")
        )
    }
}

/// `FIELD=VALUE` as the field's name and typed JSON value.
fn parse_assignment(spec: &str) -> anyhow::Result<(&str, Value)> {
    let (field, text) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("{spec:?}: expected FIELD=VALUE"))?;
    let field = known_field(field, spec)?;
    let value = match kind(field) {
        Kind::Bool => match text {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => bail!("{spec}: expected true or false"),
        },
        Kind::Integer { at_least } => match text.parse::<u32>() {
            Ok(n) if u64::from(n) >= at_least => Value::from(n),
            _ => bail!(
                "{spec}: expected an integer from {at_least} to {}",
                u32::MAX
            ),
        },
        Kind::Timestamp => {
            let t = DateTime::parse_from_rfc3339(text).map_err(|e| {
                anyhow!("{spec}: expected an RFC 3339 time such as 2026-11-27T16:00:00Z ({e})")
            })?;
            Value::String(
                t.with_timezone(&Utc)
                    .to_rfc3339_opts(SecondsFormat::AutoSi, true),
            )
        }
        Kind::Text => Value::String(text.to_string()),
    };
    Ok((field, value))
}

/// The fields `assignments` set, checked as one scope would be.
fn patch(assignments: &[String]) -> anyhow::Result<Map<String, Value>> {
    let mut patch = Map::new();
    for spec in assignments {
        let (field, value) = parse_assignment(spec)?;
        if patch.insert(field.to_string(), value).is_some() {
            bail!("{spec}: field {field} is given twice");
        }
    }
    let scope = to_scope(patch.clone())?;
    scope.validate().map_err(|e| match &e.field {
        Some(field) => {
            let spec = assignments
                .iter()
                .find(|s| s.split_once('=').is_some_and(|(f, _)| f == field))
                .map_or(field.as_str(), String::as_str);
            anyhow!("{spec}: {}", e.message)
        }
        None => anyhow!(e),
    })?;
    Ok(patch)
}

fn to_scope(fields: Map<String, Value>) -> anyhow::Result<ConfigScope> {
    let text = Value::Object(fields).to_string();
    ConfigScope::from_json(&text)
        .map(|(scope, _)| scope)
        .map_err(|e| anyhow!(e))
}

fn to_map(scope: &ConfigScope) -> Map<String, Value> {
    match serde_json::to_value(scope) {
        Ok(Value::Object(map)) => map,
        _ => unreachable!("a ConfigScope serializes to an object"),
    }
}

/// The bytes kanade stores: compact JSON of the set fields, in struct order.
fn encode(scope: &ConfigScope) -> Vec<u8> {
    serde_json::to_vec(scope).expect("a ConfigScope serializes")
}

fn decoder(key: String) -> impl Fn(&[u8]) -> Result<ConfigScope, kv::Undecodable> {
    move |bytes| {
        let text = std::str::from_utf8(bytes)
            .map_err(|e| kv::Undecodable::Refused(format!("not UTF-8: {e}")))?;
        let (scope, unknown) =
            ConfigScope::from_json(text).map_err(|e| kv::Undecodable::Refused(e.to_string()))?;
        if scope == ConfigScope::default() && !unknown.is_empty() {
            return Err(kv::Undecodable::Refused(format!(
                "holds none of the settings' fields, only {}",
                names::printable(&unknown.join(", "), 200)
            )));
        }
        if !unknown.is_empty() {
            eprintln!(
                "warning: {CONFIG_BUCKET} {key} holds fields kanade does not know ({}); \
                 they are dropped on write, as kanade's backend drops them",
                unknown.join(", ")
            );
        }
        Ok(scope)
    }
}

async fn edit(
    nats: &NatsArgs,
    scope: Scope<'_>,
    mutate: impl FnMut(&mut ConfigScope) -> anyhow::Result<()>,
) -> anyhow::Result<kv::Written<ConfigScope>> {
    let js = ops::jetstream(nats).await?;
    let store = kv::open_or_create_kv(&js, CONFIG_BUCKET, KANADE_HISTORY).await?;
    let key = scope.key();
    kv::read_modify_write(
        &store,
        CONFIG_BUCKET,
        &key,
        decoder(key.clone()),
        encode,
        mutate,
    )
    .await
}

fn print_written(scope: Scope<'_>, written: &kv::Written<ConfigScope>, what: &str) {
    ops::report_replaced(CONFIG_BUCKET, &scope.key(), written.replaced.as_ref());
    let revision = written
        .revision
        .map_or_else(|| "absent".to_string(), |r| format!("revision {r}"));
    if written.changed {
        println!("{scope}: {what}");
    } else {
        println!("{scope}: nothing changed");
    }
    println!(
        "{CONFIG_BUCKET} {scope} ({revision}): {}",
        String::from_utf8_lossy(&encode(&written.value))
    );
}

fn set(args: SetArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    let patch = patch(&args.assignments)?;
    let written = ops::block_on(edit(&args.nats, scope, |current| {
        let mut fields = to_map(current);
        fields.extend(patch.clone());
        *current = to_scope(fields)?;
        Ok(())
    }))?;
    let names: Vec<&str> = patch.keys().map(String::as_str).collect();
    print_written(scope, &written, &format!("set {}", names.join(", ")));
    Ok(())
}

fn unset(args: UnsetArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    for field in &args.fields {
        known_field(field, field)?;
    }
    let written = ops::block_on(edit(&args.nats, scope, |current| {
        let mut fields = to_map(current);
        for field in &args.fields {
            fields.remove(field);
        }
        *current = to_scope(fields)?;
        Ok(())
    }))?;
    print_written(
        scope,
        &written,
        &format!("unset {}", args.fields.join(", ")),
    );
    Ok(())
}

fn get(args: GetArgs) -> anyhow::Result<()> {
    let scope = args.scope.scope()?;
    let key = scope.key();
    let read = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        match kv::open_kv(&js, CONFIG_BUCKET).await? {
            Some(store) => kv::read(&store, CONFIG_BUCKET, &key).await,
            None => Ok(kv::Read {
                value: None,
                revision: None,
            }),
        }
    })?;
    if args.json {
        let value = read.value.unwrap_or_else(|| b"{}".to_vec());
        println!("{}", String::from_utf8_lossy(&value));
        return Ok(());
    }
    let Some(bytes) = read.value else {
        println!("{CONFIG_BUCKET} {key}: not set (wider layers and the defaults apply)");
        return Ok(());
    };
    let revision = read.revision.unwrap_or_default();
    println!(
        "{CONFIG_BUCKET} {key} (revision {revision}): {}",
        names::printable(&String::from_utf8_lossy(&bytes), 2000)
    );
    let scope = decoder(key.clone())(&bytes)
        .map_err(anyhow::Error::from)
        .with_context(|| format!("{CONFIG_BUCKET} {key}: not a configuration layer"))?;
    for (field, value) in to_map(&scope) {
        println!("  {field} = {}", names::printable(&value.to_string(), 500));
    }
    Ok(())
}

fn effective(args: EffectiveArgs) -> anyhow::Result<()> {
    let pc = ops::check_name("--pc", &args.pc)?;
    let read = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        ops::read_pc_layers(&js, CONFIG_BUCKET, pc, |key, bytes| {
            decoder(key.to_string())(bytes)
                .map_err(anyhow::Error::from)
                .with_context(|| format!("{CONFIG_BUCKET} {key}: not a configuration layer"))
        })
        .await
    })?;
    let layers = &read.layers;
    let resolved = resolve(
        layers.global.as_ref(),
        layers.groups_of(&read.groups),
        layers.pc.as_ref(),
    );
    if args.json {
        println!("{}", serde_json::to_string(&resolved.config)?);
        for c in &resolved.conflicts {
            eprintln!("warning: {c}");
        }
        return Ok(());
    }
    let groups = if read.groups.is_empty() {
        "none".to_string()
    } else {
        read.groups.join(", ")
    };
    println!("pc {pc}, groups: {groups}");
    println!("layers: {}", read.describe());
    println!("{}", serde_json::to_string_pretty(&resolved.config)?);
    for c in &resolved.conflicts {
        println!("conflict: {c}");
    }
    Ok(())
}

fn groups(args: GroupsArgs) -> anyhow::Result<()> {
    let pc = ops::check_name("--pc", &args.pc)?;
    let Some(list) = &args.set else {
        let groups = ops::block_on(async {
            let js = ops::jetstream(&args.nats).await?;
            ops::read_groups(&js, pc).await
        })?;
        print_groups(pc, &groups);
        return Ok(());
    };
    let wanted: BTreeSet<String> = list
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(|g| ops::check_name("--set", g).map(str::to_string))
        .collect::<anyhow::Result<_>>()?;
    let wanted: Vec<String> = wanted.into_iter().collect();
    let written = ops::block_on(async {
        let js = ops::jetstream(&args.nats).await?;
        let store = kv::open_or_create_kv(&js, GROUPS_BUCKET, KANADE_HISTORY).await?;
        kv::read_modify_write(
            &store,
            GROUPS_BUCKET,
            pc,
            |bytes| {
                let text = std::str::from_utf8(bytes)
                    .map_err(|e| kv::Undecodable::Refused(format!("not UTF-8: {e}")))?;
                AgentGroups::from_json(text).map_err(kv::Undecodable::Refused)
            },
            |g| serde_json::to_vec(g).expect("groups serialize"),
            |g| {
                g.groups.clone_from(&wanted);
                Ok(())
            },
        )
        .await
    })?;
    ops::report_replaced(GROUPS_BUCKET, pc, written.replaced.as_ref());
    if !written.changed {
        println!("{pc}: nothing changed");
    }
    print_groups(pc, &written.value.groups);
    Ok(())
}

fn print_groups(pc: &str, groups: &[String]) {
    if groups.is_empty() {
        println!("{pc}: no group");
    } else {
        println!("{pc}: {}", groups.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_bytes(specs: &[&str]) -> anyhow::Result<String> {
        let specs: Vec<String> = specs.iter().map(ToString::to_string).collect();
        let scope = to_scope(patch(&specs)?)?;
        Ok(String::from_utf8(encode(&scope)).unwrap())
    }

    #[test]
    fn values_are_typed_validated_and_stored_in_struct_order() {
        assert_eq!(
            set_bytes(&[
                "process_perf_top_n=5",
                "process_perf_enabled=true",
                "host_perf_interval=15s",
                "process_perf_expires_at=2026-11-28T00:30:00.5+09:00",
            ])
            .unwrap(),
            r#"{"host_perf_interval":"15s","process_perf_enabled":true,"process_perf_expires_at":"2026-11-27T15:30:00.500Z","process_perf_top_n":5}"#
        );
        assert_eq!(
            set_bytes(&["process_perf_top_n=0"]).unwrap(),
            r#"{"process_perf_top_n":0}"#
        );
        assert_eq!(
            set_bytes(&["client_display_name=a=b"]).unwrap(),
            r#"{"client_display_name":"a=b"}"#
        );
        for (spec, expected) in [
            (
                "host_perf_interval=15",
                "host_perf_interval=15: expected a duration",
            ),
            (
                "process_perf_enabled=yes",
                "process_perf_enabled=yes: expected true or false",
            ),
            (
                "max_local_concurrent=0",
                "max_local_concurrent=0: expected an integer from 1",
            ),
            (
                "process_perf_top_n=-1",
                "process_perf_top_n=-1: expected an integer from 0",
            ),
            (
                "process_perf_expires_at=tomorrow",
                "expected an RFC 3339 time",
            ),
            (
                "process_perf_enabeld=true",
                "unknown field \"process_perf_enabeld\"; known fields: max_local_concurrent,",
            ),
            ("host_perf_interval", "expected FIELD=VALUE"),
        ] {
            let err = set_bytes(&[spec]).unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
        let err = set_bytes(&["process_perf_top_n=1", "process_perf_top_n=2"]).unwrap_err();
        assert!(err.to_string().contains("given twice"), "{err}");
    }

    #[test]
    fn every_field_has_a_kind_its_decoder_accepts() {
        // A field added to ConfigScope with another type would be written as text here.
        for field in ConfigScope::FIELDS {
            let sample = match kind(field) {
                Kind::Bool => "true",
                Kind::Integer { .. } => "3",
                Kind::Timestamp => "2026-11-27T16:00:00Z",
                Kind::Text => "10m",
            };
            let scope = to_scope(patch(&[format!("{field}={sample}")]).unwrap()).unwrap();
            assert_eq!(scope.set_fields(), [*field]);
        }
    }
}
