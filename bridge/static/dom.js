// The page's elements (index.html), looked up once, and a helper to make new ones.
// Module scripts run after the document is parsed, so every element is there by now.

const $ = (selector) => document.querySelector(selector);

/** The elements of index.html that the page's modules work with. */
export const els = {
  body: document.body,
  model: $('#model-select'),
  modelInfo: $('#model-info'),
  messages: $('#messages'),
  scroller: $('#scroller'),
  empty: $('#empty'),
  composer: $('#composer'),
  prompt: $('#prompt'),
  attachButton: $('#attach'),
  attachInput: $('#attach-input'),
  attachments: $('#attachments'),
  attachError: $('#attach-error'),
  micButton: $('#mic'),
  micStatus: $('#mic-status'),
  send: $('#send'),
  stop: $('#stop'),
  stats: $('#stats'),
  temperature: $('#temperature'),
  temperatureValue: $('#temperature-value'),
  maxTokens: $('#max-tokens'),
  system: $('#system-prompt'),
  settings: $('#settings'),
  settingsToggle: $('#settings-toggle'),
  settingsClose: $('#settings-close'),
  scrim: $('#scrim'),
  newChat: $('#new-chat'),
  template: $('#message-template'),
  history: $('#history'),
  historyToggle: $('#history-toggle'),
  historyClose: $('#history-close'),
  chatSearch: $('#chat-search'),
  chatList: $('#chat-list'),
  chatListStatus: $('#chat-list-status'),
  chatItemTemplate: $('#chat-item-template'),
};

/** Matches where the sidebars sit beside the chat; narrower, they are drawers over it. */
export const wide = window.matchMedia('(min-width: 1100px)');

/**
 * Makes an element.
 *
 * @param {string} tag
 * @param {string} [className]
 * @param {string} [text] Its text content (set as text, never parsed).
 * @returns {HTMLElement}
 */
export function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}
