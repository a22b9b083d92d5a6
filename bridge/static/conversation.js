// The open chat: sending a message and streaming the reply into the transcript, Stop, starting
// a new chat and opening a stored one.
//
// A chat is created on the server with its first message; after that the page sends only the
// new message (POST /api/chats/{id}/messages) and the server supplies the context. The reply is
// a text/event-stream: `chat` (the message is kept), `queued`, `token`…, then `done` or `error`.

import * as api from './api.js';
import { loadChats, markCurrent, showListStatus, toggleHistory } from './chat-list.js';
import { els, element, wide } from './dom.js';
import { finishName } from './format.js';
import { renderMarkdown } from './markdown.js';
import { addMessage, clearTranscript, scrollToBottom, setStatus, showError, showReasoning, showStoredMessage, showToolCalls } from './messages.js';
import { hasImages, showImages, takeImages } from './attachments.js';
import { hasModels, loadModels, selectModel } from './models.js';
import { readEvents } from './sse.js';
import { clearStats, showQueued, showStats } from './stats.js';

const state = {
  conversation: [], // [{role, content}] of the open chat, as the server keeps it
  controller: null, // aborts the reply being generated; null when none is
  chatId: null, // the open chat on the server; null: a new chat, created with its first message
};

/**
 * The open chat's messages as the server keeps them (system prompt left out).
 *
 * @returns {{role: string, content: string}[]} A copy.
 */
export function conversation() {
  return state.conversation.slice();
}

/**
 * The open chat's id on the server.
 *
 * @returns {string|null} null for a new chat that has no message yet.
 */
export function openChatId() {
  return state.chatId;
}

/** Sends the prompt box's text, unless it is empty, a reply is streaming or no model is picked. */
export function submit() {
  const text = els.prompt.value.trim();
  if ((!text && !hasImages()) || state.controller) return;
  if (!els.model.value && hasModels()) return;
  els.prompt.value = '';
  autosize();
  generate(text);
}

/** Stops the reply being generated (the server cancels it); what came so far stays. */
export function stop() {
  if (state.controller) state.controller.abort();
}

/** Grows the prompt box with its text, up to 240 px. */
export function autosize() {
  els.prompt.style.height = 'auto';
  els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 240)}px`;
}

/** Starts a new, empty chat (stopping any reply being generated). */
export function newChat() {
  clearMessages();
  setOpenChat(null);
  els.empty.hidden = false;
  els.prompt.focus();
}

/**
 * Opens a stored chat: its messages, its model (where the server still has it), its id in
 * the address. On a narrow screen the sidebar drawer closes.
 *
 * @param {string} id
 * @returns {Promise<void>} Never rejects: a failure is shown above the chat list.
 */
export async function openChat(id) {
  let chat;
  try {
    chat = await api.getChat(id);
  } catch (err) {
    showListStatus(err.status === 404 ? 'That chat no longer exists.' : `Could not open the chat: ${err.message}`);
    if (state.chatId === id) newChat();
    return;
  }
  clearMessages();
  els.empty.hidden = true;
  for (const m of chat.messages) {
    showStoredMessage(m);
    if (m.role !== 'system' && m.content) state.conversation.push({ role: m.role, content: m.content });
  }
  if (!chat.messages.some((m) => m.role !== 'system')) els.empty.hidden = false;
  selectModel(chat.chat.model);
  setOpenChat(chat.chat.id);
  showListStatus('');
  if (!wide.matches) toggleHistory(false);
  scrollToBottom(true);
}

function clearMessages() {
  stop();
  state.conversation = [];
  clearTranscript();
  clearStats();
}

function setOpenChat(id) {
  state.chatId = id;
  const url = id ? `#chat=${id}` : `${location.pathname}${location.search}`;
  window.history.replaceState(null, '', url);
  markCurrent(id);
}

// The open chat's id, or a new one made on the server with the chat's first message.
async function ensureChat(model, signal) {
  if (state.chatId) return state.chatId;
  const system = els.system.value.trim();
  const chat = await api.createChat({ model, system }, signal);
  setOpenChat(chat.id);
  return chat.id;
}

function setStreaming(on) {
  els.body.dataset.state = on ? 'streaming' : 'idle';
  els.send.hidden = on;
  els.stop.hidden = !on;
  els.model.disabled = on || !hasModels();
  if (!on) state.controller = null;
}

// Sends one user message and streams the reply into a new bubble, painting at most once a
// frame. However it ends (done, error, Stop, a lost connection) the bubble gets data-finish.
async function generate(text) {
  if (state.controller) return;
  const model = els.model.value;
  const userTurn = { role: 'user', content: text };
  const turns = state.conversation;
  turns.push(userTurn);
  const images = takeImages();
  const userNode = addMessage('user', text);
  showImages(userNode, images.map((url) => ({ url })));
  const node = addMessage('assistant', '');
  node.classList.add('streaming');
  const content = node.querySelector('.content');
  const meta = node.querySelector('.meta');
  setStatus(node, 'Waiting for the model…');

  // Only the new message goes out: the server has the rest of the chat.
  const maxTokens = parseInt(els.maxTokens.value, 10);
  const body = { model, temperature: Number(els.temperature.value) };
  if (text) body.content = text;
  if (images.length) body.images = images;
  if (maxTokens > 0) body.max_tokens = maxTokens;

  const controller = new AbortController();
  state.controller = controller;
  setStreaming(true);
  /** @type {import('./stats.js').Generation} */
  const gen = { startedAt: performance.now(), firstAt: null, lastAt: null, tokens: 0, text: '', reasoning: '', calls: [], finish: '', usage: null, error: '', model };
  showStats(gen, false);

  let frame = 0;
  const paint = () => {
    frame = 0;
    content.innerHTML = renderMarkdown(gen.text);
    showStats(gen, false);
    scrollToBottom();
  };
  const schedulePaint = () => {
    if (!frame) frame = requestAnimationFrame(paint);
  };

  // One event of the stream; false: the reply has ended.
  const onEvent = (type, raw) => {
    let data = {};
    try {
      data = raw ? JSON.parse(raw) : {};
    } catch {
      return true; // not JSON: ignore the event
    }
    if (type === 'chat') {
      gen.chat = data; // the message is committed; the reply will be too, however it ends
      if (data.dropped_messages) {
        setStatus(node, `The ${data.dropped_messages} oldest messages no longer fit the model's context and were left out`);
      }
    } else if (type === 'queued') {
      setStatus(node, `Waiting, position ${data.position} in the queue`);
      showQueued(data.position);
    } else if (type === 'token') {
      const now = performance.now();
      if (gen.firstAt === null) {
        gen.firstAt = now;
        setStatus(node, '');
      }
      gen.lastAt = now;
      gen.tokens += 1;
      gen.text += data.text || '';
      if (data.reasoning) {
        gen.reasoning += data.reasoning;
        showReasoning(node, gen.reasoning);
      }
      schedulePaint();
    } else if (type === 'tool_call') {
      if (data.id) gen.calls[data.index] = { id: data.id, function: { name: data.name, arguments: '' } };
      else if (gen.calls[data.index]) gen.calls[data.index].function.arguments += data.arguments || '';
      showToolCalls(node, gen.calls.filter(Boolean));
    } else if (type === 'done') {
      gen.finish = finishName(data.finish_reason);
      gen.usage = data.usage || null;
      if (data.model) gen.model = data.model;
      if (gen.finish === 'error' && !gen.error) gen.error = data.error_message || 'The server failed while generating.';
      return false;
    } else if (type === 'error') {
      gen.error = (data.error && (data.error.message || data.error)) || 'The server reported an error.';
      return false;
    }
    return true;
  };

  try {
    const chatId = await ensureChat(model, controller.signal);
    const response = await api.postMessage(chatId, body, controller.signal);
    if (!response.body) throw new Error('This browser cannot read streamed responses.');
    for await (const event of readEvents(response.body)) {
      if (!onEvent(event.type, event.data)) break;
    }
    if (!gen.finish && !gen.error) gen.error = 'The connection closed before the reply was complete.';
  } catch (err) {
    if (err && err.name === 'AbortError') gen.finish = 'stopped';
    else gen.error = err && err.message === 'Failed to fetch' ? 'Cannot reach the tokenwire bridge.' : String((err && err.message) || err);
  } finally {
    if (frame) cancelAnimationFrame(frame);
    setStreaming(false);
  }

  // Final paint and bookkeeping.
  setStatus(node, '');
  node.classList.remove('streaming');
  content.innerHTML = renderMarkdown(gen.text);
  node.dataset.finish = gen.error ? 'error' : gen.finish;
  const statsText = showStats(gen, true);
  if (gen.tokens || gen.usage) meta.replaceChildren(element('span', '', `${gen.model ? `${gen.model} · ` : ''}${statsText}`));
  if (gen.error) showError(node, gen.error);
  if (state.conversation !== turns) return; // "New chat" was pressed meanwhile
  loadChats(); // a new chat, a new title, a new order
  if (gen.text || gen.calls.length) {
    turns.push({ role: 'assistant', content: gen.text });
  } else if (gen.chat) {
    // The server kept the message (and an empty reply): it stays in the chat as it is.
    userNode.classList.add('unanswered');
    if (gen.finish === 'stopped') content.replaceChildren(element('p', 'muted', 'Stopped before the first token.'));
  } else {
    // Nothing came back: the turn is not part of the conversation. Offer the text again.
    turns.splice(turns.indexOf(userTurn), 1);
    userNode.classList.add('unanswered');
    if (gen.finish === 'stopped') content.replaceChildren(element('p', 'muted', 'Stopped before the first token.'));
    if (!els.prompt.value) {
      els.prompt.value = text;
      autosize();
    }
  }
  scrollToBottom();
  loadModels(); // the model may have been loaded by this request
}
