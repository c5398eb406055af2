// Every decision of the top-memory guest in JavaScript, the twin of the Rust example's
// `logic.rs`: the `process_perf` gate, the cadence, which processes to keep and the
// message. Nothing here touches the WIT imports: `guest.js` passes in a host object, so
// `node --test` can run this file natively with a fake one.

/** Nanoseconds in one second, as a BigInt (WIT `u64` and `s64` arrive as BigInts). */
const NS_PER_SEC = 1_000_000_000n;

/** The cadence used when `host_perf_interval` is unparsable or zero, as the host's. */
export const FALLBACK_INTERVAL_NS = 60n * NS_PER_SEC;

/** The kanade `EffectiveConfig` built-in defaults, as far as this guest reads them. */
export const DEFAULT_CONFIG = Object.freeze({
  host_perf_interval: '60s',
  process_perf_enabled: false,
  process_perf_expires_at: null,
  process_perf_top_n: 20,
});

/** The subject this guest publishes on; the host's default grant covers it. */
export function subject(pcId) {
  return `process_mem.${pcId}`;
}

// Humantime units (the Rust `humantime` crate's) in nanoseconds.
const UNITS = new Map([
  ...['nanos', 'nsec', 'ns'].map((u) => [u, 1n]),
  ...['usec', 'us', 'µs'].map((u) => [u, 1_000n]),
  ...['millis', 'msec', 'ms'].map((u) => [u, 1_000_000n]),
  ...['seconds', 'second', 'secs', 'sec', 's'].map((u) => [u, NS_PER_SEC]),
  ...['minutes', 'minute', 'mins', 'min', 'm'].map((u) => [u, 60n * NS_PER_SEC]),
  ...['hours', 'hour', 'hrs', 'hr', 'h'].map((u) => [u, 3_600n * NS_PER_SEC]),
  ...['days', 'day', 'd'].map((u) => [u, 86_400n * NS_PER_SEC]),
  ...['weeks', 'week', 'w'].map((u) => [u, 604_800n * NS_PER_SEC]),
  ...['months', 'month', 'M'].map((u) => [u, 2_630_016n * NS_PER_SEC]),
  ...['years', 'year', 'y'].map((u) => [u, 31_557_600n * NS_PER_SEC]),
]);

/**
 * Parses a humantime duration such as `"60s"`, `"1m 30s"` or `"1h30m"` into nanoseconds;
 * `null` when it is not one.
 */
export function parseDuration(text) {
  const re = /\s*(\d+)\s*([a-zA-Zµ]+)/y;
  let total = 0n;
  let parts = 0;
  let m;
  while ((m = re.exec(text)) !== null) {
    const unit = UNITS.get(m[2]);
    if (unit === undefined) return null;
    total += BigInt(m[1]) * unit;
    parts += 1;
    if (re.lastIndex === text.length) break;
  }
  if (parts === 0 || text.slice(re.lastIndex).trim() !== '') return null;
  return total;
}

/**
 * Parses an RFC 3339 time into `{ seconds, nanoseconds }` (seconds a BigInt), exactly,
 * to the nanosecond; `null` when it is not one.
 */
export function parseRfc3339(text) {
  const m = /^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))$/.exec(
    text,
  );
  if (m === null) return null;
  const [year, month, day, hour, minute, second] = m.slice(1, 7).map(Number);
  const days = Date.UTC(year, month - 1, day) / 86_400_000;
  const check = new Date(Date.UTC(year, month - 1, day));
  if (check.getUTCMonth() !== month - 1 || hour > 23 || minute > 59 || second > 60) return null;
  const offset = m[8] ? 0 : (m[9] === '-' ? -1 : 1) * (Number(m[10]) * 3600 + Number(m[11]) * 60);
  const seconds = BigInt(days) * 86_400n + BigInt(hour * 3600 + minute * 60 + second - offset);
  const nanoseconds = Number((m[7] ?? '').padEnd(9, '0'));
  return { seconds, nanoseconds };
}

/**
 * Formats a WIT `datetime` as chrono does in JSON: RFC 3339 in UTC with `Z`, and a
 * fraction of 3, 6 or 9 digits only when there is one.
 */
export function formatRfc3339({ seconds, nanoseconds }) {
  const ms = BigInt(seconds) * 1000n;
  const base = new Date(Number(ms)).toISOString().slice(0, 19);
  let frac = '';
  if (nanoseconds !== 0) {
    const digits = String(nanoseconds).padStart(9, '0');
    frac = '.' + (nanoseconds % 1_000_000 === 0 ? digits.slice(0, 3)
      : nanoseconds % 1_000 === 0 ? digits.slice(0, 6) : digits);
  }
  return `${base}${frac}Z`;
}

/** Whether `a` (a WIT datetime) is strictly before `b`. */
function before(a, b) {
  const as = BigInt(a.seconds);
  const bs = BigInt(b.seconds);
  return as < bs || (as === bs && a.nanoseconds < b.nanoseconds);
}

/**
 * Checks and applies a configuration in the kanade `EffectiveConfig` JSON encoding.
 * Returns the new configuration; throws a message naming the field otherwise, and the
 * caller keeps the previous one.
 */
export function parseConfig(json) {
  let raw;
  try {
    raw = JSON.parse(json);
  } catch (e) {
    throw `bad config: ${e.message}`;
  }
  if (raw === null || typeof raw !== 'object' || Array.isArray(raw)) {
    throw 'bad config: expected a JSON object';
  }
  const field = (name, ok, expected) => {
    if (!(name in raw)) throw `bad config: missing field \`${name}\``;
    if (!ok(raw[name])) throw `bad config: field \`${name}\`: expected ${expected}, got ${JSON.stringify(raw[name])}`;
    return raw[name];
  };
  const config = {
    host_perf_interval: field('host_perf_interval', (v) => typeof v === 'string', 'a string'),
    process_perf_enabled: field('process_perf_enabled', (v) => typeof v === 'boolean', 'a boolean'),
    process_perf_top_n: field(
      'process_perf_top_n',
      (v) => Number.isInteger(v) && v >= 0 && v <= 0xffff_ffff,
      'an unsigned 32-bit integer',
    ),
    process_perf_expires_at: null,
  };
  const expires = raw.process_perf_expires_at ?? null;
  if (expires !== null) {
    config.process_perf_expires_at =
      typeof expires === 'string' ? parseRfc3339(expires) : null;
    if (config.process_perf_expires_at === null) {
      throw `bad config: field \`process_perf_expires_at\`: expected an RFC 3339 time or null, got ${JSON.stringify(expires)}`;
    }
  }
  return config;
}

/** The cadence this guest wants, in nanoseconds: `host_perf_interval`, as the default guest. */
export function intervalNs(config) {
  const ns = parseDuration(config.host_perf_interval);
  return ns === null || ns === 0n ? FALLBACK_INTERVAL_NS : ns;
}

/**
 * Indices of the `n` largest readings, largest first; equal readings keep sample order.
 * One pass that keeps the top `n` in order: the engine interprets this code, and most
 * readings are compared once (a full sort cost 12x more at 10,000 processes).
 */
export function topByMemory(rssBytes, n) {
  const top = [];
  for (let i = 0; i < rssBytes.length; i++) {
    const v = rssBytes[i];
    // Not above the smallest kept: an equal reading comes later in the sample, so it loses.
    if (top.length === n && !(v > rssBytes[top[n - 1]])) continue;
    let k = top.length;
    while (k > 0 && rssBytes[top[k - 1]] < v) k--;
    top.splice(k, 0, i);
    if (top.length > n) top.pop();
  }
  return top;
}

/**
 * One tick at wall-clock time `wall` (a WIT datetime). `host` has `sampleMemory()`
 * (returning `{ pids, rssBytes }` or throwing a message), `names(pids)`,
 * `publish(subject, bytes)` (throwing a message), `warn(message)` and `pcId()`.
 */
export function tick(config, wall, host) {
  // An inactive tick must stay cheap: the gate is checked before any host call.
  const expires = config.process_perf_expires_at;
  if (!config.process_perf_enabled || (expires !== null && !before(wall, expires))) return;
  let sample;
  try {
    sample = host.sampleMemory();
  } catch (e) {
    host.warn(`process sampling failed: ${e}`);
    return;
  }
  if (sample.rssBytes.length !== sample.pids.length) {
    // A column that does not line up would pair the wrong memory with a pid.
    host.warn(
      `sample has ${sample.pids.length} pids but ${sample.rssBytes.length} memory readings; skipping this tick`,
    );
    return;
  }
  const top = topByMemory(sample.rssBytes, Math.max(config.process_perf_top_n, 1));
  // Names cross the sandbox boundary slowly, so only the kept processes get one.
  const names = host.names(Uint32Array.from(top, (i) => sample.pids[i]));
  const pcId = host.pcId();
  // Written by hand: resident memory is a u64, which JSON.stringify cannot write exactly.
  const processes = top.map(
    (i, k) =>
      `{"pid":${sample.pids[i]},"name":${JSON.stringify(names[k] ?? '')},"rss_bytes":${sample.rssBytes[i]}}`,
  );
  const message = `{"pc_id":${JSON.stringify(pcId)},"at":"${formatRfc3339(wall)}","processes":[${processes.join(',')}]}`;
  // A lost message is not worth failing the tick over: the next one carries fresh data.
  try {
    host.publish(subject(pcId), new TextEncoder().encode(message));
  } catch (e) {
    host.warn(`publish ${subject(pcId)}: ${e}`);
  }
}
