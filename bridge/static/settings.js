// The settings drawer: generation settings and the chosen model, kept in this browser's
// localStorage, and the drawer's opening and closing.

import { els, wide } from './dom.js';

const SETTINGS_KEY = 'tokenwire.settings.v1';
let savedModel = '';

/** Fills the settings form from localStorage; call once, before the model list is loaded. */
export function loadSettings() {
  let saved = {};
  try {
    saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}') || {};
  } catch {
    saved = {};
  }
  if (typeof saved.temperature === 'number') els.temperature.value = String(saved.temperature);
  if (Number.isInteger(saved.maxTokens) && saved.maxTokens > 0) els.maxTokens.value = String(saved.maxTokens);
  if (typeof saved.system === 'string') els.system.value = saved.system;
  savedModel = typeof saved.model === 'string' ? saved.model : '';
  showTemperature();
}

/** Stores the settings form and the picked model in localStorage (for this tab only where that fails). */
export function saveSettings() {
  const settings = {
    temperature: Number(els.temperature.value),
    maxTokens: parseInt(els.maxTokens.value, 10) || undefined,
    system: els.system.value,
    model: els.model.value || savedModel || '',
  };
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch {
    /* private mode: settings last for this tab only */
  }
}

/**
 * The model picked on the last visit ("" for none).
 *
 * @returns {string}
 */
export function savedModelId() {
  return savedModel;
}

/** Shows the temperature slider's value beside it. */
export function showTemperature() {
  const t = Number(els.temperature.value);
  els.temperatureValue.textContent = t === 0 ? '0 (greedy)' : t.toFixed(2);
}

/**
 * Opens or closes the settings: a collapsible column on wide screens, a drawer on narrow ones.
 *
 * @param {boolean} [open] Omitted: toggle.
 */
export function toggleSettings(open) {
  if (wide.matches) {
    const collapsed = open === undefined ? !els.body.classList.contains('settings-collapsed') : !open;
    els.body.classList.toggle('settings-collapsed', collapsed);
    els.settingsToggle.setAttribute('aria-expanded', String(!collapsed));
  } else {
    const isOpen = open === undefined ? !els.body.classList.contains('settings-open') : open;
    els.body.classList.toggle('settings-open', isOpen);
    els.scrim.hidden = !isOpen;
    els.settingsToggle.setAttribute('aria-expanded', String(isOpen));
    if (isOpen) els.settingsClose.focus();
  }
}
