// The top-memory guest's entry point for componentize-js: adapts `logic.js` to the
// `collector:api@0.1.0` WIT world (imports in, the `guest` interface out).

import { sample, names } from 'collector:api/processes@0.1.0';
import { publish } from 'collector:api/publish@0.1.0';
import { log } from 'collector:api/log@0.1.0';
import { pcId } from 'collector:api/identity@0.1.0';

import { DEFAULT_CONFIG, intervalNs, parseConfig, tick } from './logic.js';

// The host never calls a guest concurrently: one instance, one state.
let config = DEFAULT_CONFIG;

/** A WIT error arrives as a thrown value whose `payload` is the variant. */
function payload(e) {
  return e !== null && typeof e === 'object' && 'payload' in e ? e.payload : e;
}

/** The host's imports, seen as `logic.js` wants them. */
const host = {
  sampleMemory() {
    try {
      const s = sample({ cpu: false, memory: true, disk: false });
      return { pids: s.pids, rssBytes: s.rssBytes };
    } catch (e) {
      const err = payload(e);
      throw err?.tag === 'not-granted' ? 'process sampling not granted' : String(err?.val ?? err);
    }
  },
  names(pids) {
    return names(pids);
  },
  publish(subject, bytes) {
    try {
      publish(subject, bytes);
    } catch (e) {
      const err = payload(e);
      switch (err?.tag) {
        case 'not-granted':
          throw 'subject not granted';
        case 'too-large':
          throw `payload over the ${err.val}-byte limit`;
        case 'rate-limited':
          throw 'rate limited';
        default:
          throw String(err?.val ?? err);
      }
    }
  },
  warn(message) {
    log('warn', message);
  },
  pcId() {
    return pcId();
  },
};

/** The `collector:api/guest` export. */
export const guest = {
  configure(json) {
    // On a bad config the error is the guest's answer and the previous one stays.
    config = parseConfig(json);
  },
  interval() {
    return intervalNs(config);
  },
  tick(now) {
    tick(config, now.wall, host);
  },
  saveState() {
    // Nothing is carried: `undefined` is `none`.
    return undefined;
  },
  restoreState(_state) {
    // Nothing is carried, so a predecessor's state changes nothing: accepting it is the
    // same as starting fresh, without a warning.
  },
};
