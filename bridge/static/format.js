// Text for the page: sizes, counts, dates, and the bridge's state and finish names. Pure functions.

/**
 * A byte count for people: "512 B", "2.4 MB", "135 MB".
 *
 * @param {number|string} n Bytes.
 * @returns {string}
 */
export function humanBytes(n) {
  let value = Number(n) || 0;
  for (const unit of ['B', 'KB', 'MB', 'GB', 'TB']) {
    if (value < 1024 || unit === 'TB') return unit === 'B' ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${unit}`;
    value /= 1024;
  }
  return String(n);
}

/**
 * A large count, short: "135M", "1.7B", "12K".
 *
 * @param {number|string} n
 * @returns {string}
 */
export function humanCount(n) {
  const value = Number(n) || 0;
  if (value >= 1e9) return `${(value / 1e9).toFixed(1)}B`;
  if (value >= 1e6) return `${Math.round(value / 1e6)}M`;
  if (value >= 1e3) return `${Math.round(value / 1e3)}K`;
  return String(value);
}

/**
 * When a chat was updated: the time for today, else the date (with the year if not this year).
 *
 * @param {number} ms Milliseconds since the epoch.
 * @returns {string}
 */
export function whenText(ms) {
  const date = new Date(ms);
  const now = new Date();
  if (date.toDateString() === now.toDateString()) return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  return date.toLocaleDateString([], { year: date.getFullYear() === now.getFullYear() ? undefined : 'numeric', month: 'short', day: 'numeric' });
}

/**
 * A model's state as a lower-case name ("available", "loaded", "failed", …), from an /api/models
 * entry's `state` (a MODEL_STATE_ prefix is dropped) or, lacking one, its `loaded` flag.
 *
 * @param {{state?: string, loaded?: boolean}} m
 * @returns {string}
 */
export function modelState(m) {
  return String(m.state || (m.loaded ? 'loaded' : 'available')).replace(/^MODEL_STATE_/, '').toLowerCase();
}

/**
 * The `finish_reason` of a stream's `done` event ("stop", "length", "cancelled", "error"), or
 * "done" where the event has none.
 *
 * @param {string|undefined|null} reason
 * @returns {string}
 */
export function finishName(reason) {
  return String(reason || '').toLowerCase() || 'done';
}
