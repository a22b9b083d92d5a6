// The status line under the composer (#stats): while a reply streams, figures measured in the
// page; at the end, how it finished and the server's own usage figures where it sent them.

import { els } from './dom.js';

const FINISH_LABELS = { stop: 'complete', length: 'max tokens reached', stopped: 'stopped', cancelled: 'cancelled', error: 'error' };

/**
 * One reply being generated, as the page tracks it.
 *
 * @typedef {object} Generation
 * @property {number} startedAt performance.now() when it was sent.
 * @property {number|null} firstAt When the first token came (null: none yet).
 * @property {number|null} lastAt When the latest token came.
 * @property {number} tokens Tokens received.
 * @property {string} text The reply so far.
 * @property {string} finish How it ended: a finish_reason name, or "stopped" (the Stop button); "" while it runs.
 * @property {object|null} usage The `done` event's usage figures.
 * @property {string} error Why it failed ("" if it did not).
 * @property {string} model The model that answers.
 * @property {object} [chat] The `chat` event: the server has kept the user's message.
 */

function liveFigures(gen) {
  const parts = [];
  if (gen.firstAt !== null) parts.push(`first token ${Math.round(gen.firstAt - gen.startedAt)} ms`);
  if (gen.tokens >= 2 && gen.lastAt > gen.firstAt) {
    parts.push(`${((gen.tokens - 1) / ((gen.lastAt - gen.firstAt) / 1000)).toFixed(1)} tok/s`);
  }
  parts.push(`${gen.tokens} token${gen.tokens === 1 ? '' : 's'}`);
  return parts;
}

function finalFigures(gen) {
  const u = gen.usage;
  if (!u) return liveFigures(gen);
  const parts = [
    `first token ${Math.round(u.time_to_first_token_ms || 0)} ms`,
    `${Number(u.decode_tokens_per_second || 0).toFixed(1)} tok/s`,
    `${u.completion_tokens} tokens`,
    `${u.prompt_tokens} prompt`,
  ];
  if (u.queue_time_ms >= 50) parts.push(`queued ${Math.round(u.queue_time_ms)} ms`);
  return parts;
}

/**
 * Shows a reply's figures in #stats and sets its data-finish ("" while streaming) and
 * data-source ("server" where the final figures are the server's usage, else "client").
 *
 * @param {Generation} gen
 * @param {boolean} final Whether the reply has ended.
 * @returns {string} The text shown.
 */
export function showStats(gen, final) {
  const finish = final ? (gen.error ? 'error' : gen.finish || 'done') : '';
  const label = final ? FINISH_LABELS[finish] || finish : gen.tokens ? 'streaming' : 'waiting';
  const figures = final && gen.error && !gen.tokens ? [] : final ? finalFigures(gen) : liveFigures(gen);
  const text = [label, ...figures].join(' · ');
  els.stats.textContent = text;
  els.stats.dataset.finish = finish;
  els.stats.dataset.source = final && gen.usage ? 'server' : 'client';
  return text;
}

/**
 * Shows the queue position in #stats while a reply waits for the server.
 *
 * @param {number} position
 */
export function showQueued(position) {
  els.stats.textContent = `waiting · position ${position} in the queue`;
}

/** Empties #stats (a new or another chat). */
export function clearStats() {
  els.stats.textContent = '';
  els.stats.dataset.finish = '';
}
