// Unit tests of `logic.js` under Node's own test runner (`node --test src/`), with a
// scripted host: the decisions are checked natively, the scenarios check the component.

import { test } from 'node:test';
import assert from 'node:assert/strict';

import {
  DEFAULT_CONFIG,
  formatRfc3339,
  intervalNs,
  parseConfig,
  parseDuration,
  parseRfc3339,
  tick,
  topByMemory,
} from './logic.js';

/** A scripted host that records what the guest asked of it. */
function fakeHost(rows, { failPublish = false } = {}) {
  const h = {
    samples: 0,
    namesAsked: [],
    published: [],
    warnings: [],
    sampleMemory() {
      h.samples += 1;
      return {
        pids: Uint32Array.from(rows, (r) => r[0]),
        rssBytes: BigUint64Array.from(rows, (r) => BigInt(r[1])),
      };
    },
    names(pids) {
      h.namesAsked.push(...pids);
      return Array.from(pids, (p) => `proc-${p}`);
    },
    publish(subject, bytes) {
      if (failPublish) throw 'broker down';
      h.published.push([subject, JSON.parse(new TextDecoder().decode(bytes))]);
    },
    warn(message) {
      h.warnings.push(message);
    },
    pcId() {
      return 'pc-1';
    },
  };
  return h;
}

/** The defaults overlaid with `overrides`, as the host sends them. */
function config(overrides) {
  return parseConfig(JSON.stringify({ ...DEFAULT_CONFIG, target_version: null, ...overrides }));
}

const T0 = { seconds: 1_800_000_000n, nanoseconds: 0 };

test('off by default touches nothing', () => {
  const h = fakeHost([[1, 100]]);
  tick(DEFAULT_CONFIG, T0, h);
  assert.equal(h.samples + h.published.length, 0);
});

test('keeps the largest first with ties in sample order', () => {
  const h = fakeHost([[1, 10], [2, 500], [3, 70], [4, 500], [5, 900]]);
  tick(config({ process_perf_enabled: true, process_perf_top_n: 3 }), T0, h);
  assert.deepEqual(h.published, [
    [
      'process_mem.pc-1',
      {
        pc_id: 'pc-1',
        at: '2027-01-15T08:00:00Z',
        processes: [
          { pid: 5, name: 'proc-5', rss_bytes: 900 },
          { pid: 2, name: 'proc-2', rss_bytes: 500 },
          { pid: 4, name: 'proc-4', rss_bytes: 500 },
        ],
      },
    ],
  ]);
  assert.deepEqual(h.namesAsked, [5, 2, 4]);
});

test('the one-pass top-N agrees with a stable sort', () => {
  let seed = 12345;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648);
  for (const [len, n] of [[0, 3], [1, 1], [50, 5], [500, 20], [30, 100]]) {
    // Few distinct readings, so that ties are common.
    const rss = BigUint64Array.from({ length: len }, () => BigInt(next() % 7) * 1000n);
    const sorted = Array.from(rss.keys())
      .sort((a, b) => (rss[a] < rss[b] ? 1 : rss[a] > rss[b] ? -1 : 0))
      .slice(0, n);
    assert.deepEqual(topByMemory(rss, n), sorted, `len ${len}, n ${n}`);
  }
});

test('memory beyond 2^53 is written exactly', () => {
  const h = fakeHost([[1, '18446744073709551615']]);
  const c = config({ process_perf_enabled: true });
  let bytes;
  tick(c, T0, { ...h, publish: (_s, b) => (bytes = new TextDecoder().decode(b)) });
  assert.match(bytes, /"rss_bytes":18446744073709551615\}/);
});

test('expiry is exclusive, to the nanosecond', () => {
  const c = config({ process_perf_enabled: true, process_perf_expires_at: '2027-01-15T08:01:00.5Z' });
  const h = fakeHost([[1, 10]]);
  tick(c, { seconds: T0.seconds + 60n, nanoseconds: 499_999_999 }, h);
  tick(c, { seconds: T0.seconds + 60n, nanoseconds: 500_000_000 }, h);
  assert.equal(h.samples, 1);
});

test('interval follows host_perf_interval, with the host fallback', () => {
  assert.equal(intervalNs(config({})), 60_000_000_000n);
  assert.equal(intervalNs(config({ host_perf_interval: '1m 30s' })), 90_000_000_000n);
  assert.equal(intervalNs(config({ host_perf_interval: '0s' })), 60_000_000_000n);
  assert.equal(intervalNs(config({ host_perf_interval: 'soon' })), 60_000_000_000n);
});

test('durations and times parse as the Rust guest parses them', () => {
  assert.equal(parseDuration('1h30m'), 5_400_000_000_000n);
  assert.equal(parseDuration('250ms'), 250_000_000n);
  assert.equal(parseDuration('10 parsecs'), null);
  assert.equal(parseDuration(''), null);
  assert.deepEqual(parseRfc3339('2026-03-01T12:30:00+01:00'), {
    seconds: 1_772_364_600n,
    nanoseconds: 0,
  });
  assert.equal(parseRfc3339('2026-02-30T00:00:00Z'), null);
  assert.equal(formatRfc3339({ seconds: 1_772_368_200n, nanoseconds: 120_000_000 }), '2026-03-01T12:30:00.120Z');
  assert.equal(formatRfc3339({ seconds: 1_772_368_200n, nanoseconds: 7 }), '2026-03-01T12:30:00.000000007Z');
});

test('a bad config names the field', () => {
  assert.throws(() => config({ process_perf_top_n: -1 }), /process_perf_top_n/);
  assert.throws(() => parseConfig('{}'), /missing field `host_perf_interval`/);
  assert.throws(() => parseConfig('[1]'), /expected a JSON object/);
});

test('failures are warnings, not exceptions', () => {
  const h = fakeHost([[1, 10]], { failPublish: true });
  tick(config({ process_perf_enabled: true }), T0, h);
  assert.deepEqual(h.warnings, ['publish process_mem.pc-1: broker down']);
});
