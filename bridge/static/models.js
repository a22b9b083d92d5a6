// The model picker in the top bar and the model card in the settings, from GET /api/models.

import * as api from './api.js';
import { els, element } from './dom.js';
import { humanBytes, humanCount, modelState } from './format.js';
import { savedModelId } from './settings.js';

/** @type {object[]} The server's models, as /api/models last listed them. */
let models = [];

/**
 * Whether the server listed any model.
 *
 * @returns {boolean}
 */
export function hasModels() {
  return models.length > 0;
}

/**
 * Fetches the model list and shows it. On failure the list already shown stays; with none, the
 * picker says the server is unreachable. Sets body[data-models] to "ready", "empty" or "error".
 *
 * @returns {Promise<void>} Never rejects.
 */
export async function loadModels() {
  try {
    // The picker offers the models that chat (kind generate): not embedding, speech or OCR models.
    models = (await api.listModels()).filter((m) => !m.kind || m.kind === 'generate');
    renderModels();
  } catch (err) {
    if (models.length) return; // keep the list we have
    els.model.replaceChildren(new Option('No models: server unreachable', ''));
    els.model.disabled = true;
    els.modelInfo.replaceChildren(element('p', 'error-text', `Could not load the model list: ${err.message}`));
    els.body.dataset.models = 'error';
  }
}

/**
 * Picks a model in the picker, if the server has it and it has not failed to load.
 *
 * @param {string} id
 * @returns {boolean} Whether it was picked.
 */
export function selectModel(id) {
  if (!id || !models.some((m) => m.id === id && modelState(m) !== 'failed')) return false;
  els.model.value = id;
  renderModelInfo();
  return true;
}

// Fills the picker, keeping the current (or the saved) choice where it is still usable, else
// the default model, else the first usable one.
function renderModels() {
  const current = els.model.value || savedModelId();
  const usable = models.filter((m) => modelState(m) !== 'failed');
  els.model.replaceChildren();
  if (!models.length) {
    els.model.append(new Option('No models in the store', ''));
    els.model.disabled = true;
    els.modelInfo.replaceChildren(element('p', 'muted', 'The server has no models. Run `tokenwire pull smollm2-135m`.'));
    els.body.dataset.models = 'empty';
    return;
  }
  for (const m of models) {
    const label = `${m.id}${m.is_default ? ' (default)' : ''} · ${humanBytes(m.size_bytes)} · ${modelState(m)}`;
    const option = new Option(label, m.id);
    option.disabled = modelState(m) === 'failed';
    option.dataset.state = modelState(m);
    els.model.append(option);
  }
  const pick = usable.find((m) => m.id === current) || usable.find((m) => m.is_default) || usable[0];
  if (pick) els.model.value = pick.id;
  els.model.disabled = els.body.dataset.state === 'streaming';
  els.body.dataset.models = 'ready';
  renderModelInfo();
}

/** Shows the picked model's facts in the settings' model card. */
export function renderModelInfo() {
  const m = models.find((x) => x.id === els.model.value);
  if (!m) {
    els.modelInfo.replaceChildren(element('p', 'muted', 'No model selected.'));
    return;
  }
  const head = element('div', 'model-head');
  head.append(element('span', 'model-id', m.id));
  const badge = element('span', `badge state-${modelState(m)}`, modelState(m));
  head.append(badge);
  if (m.is_default) head.append(element('span', 'badge default', 'default'));
  const facts = element('dl', 'facts');
  const add = (term, value) => {
    if (value === undefined || value === null || value === '') return;
    const row = element('div');
    row.append(element('dt', '', term), element('dd', '', String(value)));
    facts.append(row);
  };
  add('Architecture', m.architecture);
  add('Parameters', m.parameter_count ? humanCount(m.parameter_count) : '');
  add('Precision', m.precision);
  add('Context', m.context_length ? `${Number(m.context_length).toLocaleString()} tokens` : '');
  add('Size on disk', humanBytes(m.size_bytes));
  if (m.aliases && m.aliases.length) add('Aliases', m.aliases.join(', '));
  const parts = [head, facts];
  if (m.error_message) parts.push(element('p', 'error-text', m.error_message));
  els.modelInfo.replaceChildren(...parts);
}
