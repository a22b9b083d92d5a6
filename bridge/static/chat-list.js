// The Chats sidebar: the chats the server keeps, listed or searched, renamed in place and
// deleted; on narrow screens it is a drawer. Opening a chat is the conversation's job: the
// page wires the list's clicks to it.

import * as api from './api.js';
import { els, element, wide } from './dom.js';
import { whenText } from './format.js';

let currentId = null; // the open chat, marked aria-current in the list
let searchSeq = 0; // numbers the loads, so that only the newest answer is shown
let searchTimer = 0;

/**
 * Marks the open chat in the list (and in the lists loaded later).
 *
 * @param {string|null} id The open chat's id; null for a new, unsaved chat.
 */
export function markCurrent(id) {
  currentId = id;
  for (const item of els.chatList.querySelectorAll('.chat-item')) {
    if (item.dataset.chatId === id) item.setAttribute('aria-current', 'true');
    else item.removeAttribute('aria-current');
  }
}

/**
 * Shows a line of text above the list ("" clears it).
 *
 * @param {string} text
 */
export function showListStatus(text) {
  els.chatListStatus.textContent = text;
}

/**
 * Loads the list again: the latest chats, or the search results for the text in the search
 * box. Sets #history[data-loaded] to "list", "search" or "error" once it is shown.
 *
 * @returns {Promise<void>} Never rejects.
 */
export async function loadChats() {
  const query = els.chatSearch.value.trim();
  const seq = ++searchSeq;
  try {
    const entries = query ? await api.searchChats(query) : await api.listChats(100);
    if (seq !== searchSeq) return; // a newer search answered first
    renderChatList(entries);
    showListStatus(entries.length ? '' : query ? 'No chats match.' : 'No chats yet.');
    els.history.dataset.loaded = query ? 'search' : 'list';
  } catch (err) {
    if (seq !== searchSeq) return;
    showListStatus(`Could not load chats: ${err.message}`);
    els.history.dataset.loaded = 'error';
  }
}

/** Loads the list again once the search box has been still for 200 ms. */
export function searchSoon() {
  clearTimeout(searchTimer);
  searchTimer = setTimeout(loadChats, 200);
}

function snippetNode(snippet) {
  const line = element('span', 'chat-snippet');
  line.append(`${snippet.role === 'user' ? 'You' : snippet.role === 'assistant' ? 'AI' : 'System'}: `);
  for (const span of snippet.spans) line.append(span.highlighted ? element('mark', '', span.text) : span.text);
  return line;
}

// entries: chats (GET /api/chats) or {chat, snippets} (GET /api/chats/search).
function renderChatList(entries) {
  const items = entries.map((entry) => {
    const chat = entry.chat || entry;
    const item = els.chatItemTemplate.content.firstElementChild.cloneNode(true);
    item.dataset.chatId = chat.id;
    item.querySelector('.chat-title').textContent = chat.title || 'Untitled chat';
    item.querySelector('.chat-when').textContent = whenText(chat.updated_ms);
    if (entry.snippets) item.querySelector('.chat-snippets').append(...entry.snippets.map(snippetNode));
    if (chat.id === currentId) item.setAttribute('aria-current', 'true');
    return item;
  });
  els.chatList.replaceChildren(...items);
}

/**
 * Swaps a list item's title for a text field: Enter (or leaving the field) saves the new
 * title on the server, Escape keeps the old one. The list is loaded again either way.
 *
 * @param {HTMLElement} item A .chat-item of the list.
 */
export function startRename(item) {
  if (item.querySelector('.chat-title-input')) return;
  const open = item.querySelector('.chat-open');
  const input = element('input', 'chat-title-input');
  input.value = item.querySelector('.chat-title').textContent;
  input.maxLength = 200;
  input.setAttribute('aria-label', 'Chat title');
  input.dataset.testid = 'chat-title-input';
  open.hidden = true;
  item.insertBefore(input, open);
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (save && title) {
      try {
        await api.renameChat(item.dataset.chatId, title);
      } catch (err) {
        showListStatus(`Could not rename: ${err.message}`);
      }
    }
    input.remove();
    open.hidden = false;
    loadChats();
  };
  input.addEventListener('keydown', (event) => {
    if (event.key === 'Enter') {
      event.preventDefault();
      finish(true);
    } else if (event.key === 'Escape') {
      event.preventDefault();
      finish(false);
    }
  });
  input.addEventListener('blur', () => finish(true));
}

/**
 * Deletes a chat on the server. A chat that is already gone counts as deleted; any other
 * failure is shown above the list.
 *
 * @param {string} id
 * @returns {Promise<boolean>} Whether the chat is gone (the caller then reloads the list).
 */
export async function removeChat(id) {
  try {
    await api.deleteChat(id);
  } catch (err) {
    if (err.status !== 404) {
      showListStatus(`Could not delete: ${err.message}`);
      return false;
    }
  }
  return true;
}

/**
 * Opens or closes the sidebar: a collapsible column on wide screens, a drawer on narrow ones
 * (which puts the focus in the search box when it opens).
 *
 * @param {boolean} [open] Omitted: toggle.
 */
export function toggleHistory(open) {
  if (wide.matches) {
    const collapsed = open === undefined ? !els.body.classList.contains('history-collapsed') : !open;
    els.body.classList.toggle('history-collapsed', collapsed);
    els.historyToggle.setAttribute('aria-expanded', String(!collapsed));
  } else {
    const isOpen = open === undefined ? !els.body.classList.contains('history-open') : open;
    els.body.classList.toggle('history-open', isOpen);
    els.scrim.hidden = !isOpen && !els.body.classList.contains('settings-open');
    els.historyToggle.setAttribute('aria-expanded', String(isOpen));
    if (isOpen) els.chatSearch.focus();
  }
}
