// The open chat: sending a message and streaming the reply into the transcript, Stop, starting
// a new chat and opening a stored one.
//
// A chat is created on the server with its first message; after that the page sends only the
// new message (POST /api/chats/{id}/messages) and the server supplies the context. The reply is
// a text/event-stream: `chat` (the message is kept), `queued`, `token`…, then `done` or `error`.
//
// The reply lives on the server, not in the page's connection: when the stream drops before its
// end, the page follows it again from the last event it has (Last-Event-ID), and a chat opened
// (or reloaded) while its last reply is still being written shows the text so far, then the rest
// live. Leaving a chat only stops following its reply; Stop stops it on the server.

import * as api from './api.js';
import { loadChats, markCurrent, showListStatus, toggleHistory } from './chat-list.js';
import { els, element, wide } from './dom.js';
import { finishName } from './format.js';
import { renderMarkdown } from './markdown.js';
import { addMessage, clearTranscript, scrollToBottom, setStatus, showContextLimit, showError, showReasoning, showStoredMessage, showToolCalls } from './messages.js';
import { hasImages, showImages, takeImages } from './attachments.js';
import { hasModels, loadModels, selectModel } from './models.js';
import { readEvents } from './sse.js';
import { clearStats, showQueued, showStats } from './stats.js';

const state = {
  conversation: [], // [{role, content}] of the open chat, as the server keeps it
  controller: null, // aborts following the reply being written (the server goes on); null when none is
  reply: null, // that reply: {chatId, messageId, lastEventId, stopping, stored}; null when none is
  chatId: null, // the open chat on the server; null: a new chat, created with its first message
};

// How long the page waits before each try to follow a reply again after its stream broke (ms):
// about half a minute in all, well within the time the server keeps a reply nobody follows.
const RETRY_MS = [250, 500, 1000, 2000, 4000, 8000, 15000];
// A stored reply's status as the finish names of a streamed one.
const STATUS_FINISH = { complete: 'stop', length: 'length', stopped: 'stopped', cancelled: 'cancelled', error: 'error', interrupted: 'error' };

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

/**
 * Stops the reply being generated, on the server (POST .../stop); what came so far stays. The
 * stream then ends with its `done`; if it does not (the connection is gone) the page stops
 * following once the server has answered.
 */
export function stop() {
  const { reply, controller } = state;
  if (!reply || !controller) return;
  reply.stopping = true;
  if (!reply.messageId) {
    controller.abort(); // not begun yet: the call ending leaves the reply unwritten (stored as stopped)
    return;
  }
  api.stopReply(reply.chatId, reply.messageId)
    .then((stored) => {
      reply.stored = stored;
    }, () => {})
    .finally(() => {
      if (state.controller === controller) controller.abort();
    });
}

/** Stops following the reply being written, which goes on on the server (leaving its chat). */
function detach() {
  if (!state.controller) return;
  state.controller.abort();
  setStreaming(false); // at once: the chat opened next may follow a reply of its own
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
    if (m.role !== 'system' && m.content && m.status !== 'pending') state.conversation.push({ role: m.role, content: m.content });
  }
  if (!chat.messages.some((m) => m.role !== 'system')) els.empty.hidden = false;
  // What the model saw in the latest turn: where its view of the chat begins.
  const replies = chat.messages.filter((m) => m.role === 'assistant' && m.status !== 'pending');
  if (replies.length) showContextLimit(replies[replies.length - 1].dropped_messages || 0);
  selectModel(chat.chat.model);
  setOpenChat(chat.chat.id);
  showListStatus('');
  if (!wide.matches) toggleHistory(false);
  scrollToBottom(true);
  const last = chat.messages[chat.messages.length - 1];
  if (last && last.role === 'assistant' && last.status === 'pending') {
    const node = els.messages.querySelector(`.message.assistant[data-message-id="${last.id}"]`);
    if (node) followReply(chat.chat.id, last, node);
  }
}

// Follows a reply of the open chat still being written (after a reload, or opening its chat
// again): the text so far at once (its events from the first), then the rest as it comes.
async function followReply(chatId, m, node) {
  if (state.controller) return;
  const gen = newGeneration(m.model || '');
  const reply = { chatId, messageId: m.id, lastEventId: 0, stopping: false, stored: null };
  delete node.dataset.finish;
  node.querySelector('.meta').replaceChildren();
  await streamReply(node, gen, reply, null);
  if (state.chatId !== chatId) return; // another chat was opened meanwhile
  if (gen.text) state.conversation.push({ role: 'assistant', content: gen.text });
  loadChats();
}

function clearMessages() {
  detach();
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
  if (!on) {
    state.controller = null;
    state.reply = null;
  }
}

/**
 * @param {string} model
 * @returns {import('./stats.js').Generation}
 */
function newGeneration(model) {
  return { startedAt: performance.now(), firstAt: null, lastAt: null, tokens: 0, text: '', reasoning: '', calls: [], finish: '', usage: null, error: '', model };
}

// A pause that Stop (or leaving the chat) cuts short with an AbortError.
function pause(ms, signal) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => {
      clearTimeout(timer);
      reject(new DOMException('Aborted', 'AbortError'));
    }, { once: true });
  });
}

// Reads a reply's events into onEvent until it returns false ('ended'). When the stream breaks
// first (the connection dropped, the bridge restarted) it follows the reply again after the
// last event it has, trying for about half a minute ('lost' then); 'gone' when the reply ended
// meanwhile (the store has it). With no `first` response, it starts by following the reply.
async function follow(first, reply, onEvent, signal) {
  let response = first;
  let failures = 0;
  for (;;) {
    if (response) {
      try {
        for await (const event of readEvents(response.body)) {
          failures = 0;
          if (event.id) reply.lastEventId = Number(event.id);
          if (!onEvent(event.type, event.data)) return 'ended';
        }
      } catch (err) {
        if (signal.aborted) throw err; // Stop, or leaving the chat; a broken stream is followed again below
      }
      failures += 1;
    }
    if (!reply.messageId || failures > RETRY_MS.length) return 'lost'; // no reply began: nothing to follow
    if (failures) await pause(RETRY_MS[failures - 1], signal);
    try {
      response = await api.watchReply(reply.chatId, reply.messageId, reply.lastEventId, signal);
    } catch (err) {
      if (signal.aborted) throw err;
      if (err.status === 409) return 'gone';
      if (err.status && err.status < 500) throw err;
      response = null; // unreachable or unavailable for now: try again
      failures += 1;
    }
  }
}

// A reply that ended while the page was not following it, as the chat stores it.
async function readStoredReply(reply, gen) {
  const chat = await api.getChat(reply.chatId);
  const m = chat.messages.find((x) => x.id === reply.messageId);
  if (!m) throw new Error('The reply is gone from the chat.');
  gen.text = m.content;
  gen.reasoning = m.reasoning || '';
  gen.calls = m.tool_calls || [];
  gen.usage = m.usage || null;
  gen.finish = STATUS_FINISH[m.status] || m.status;
  if (m.status === 'error' || m.status === 'interrupted') gen.error = m.error_message || 'The server failed while generating.';
}

// Sends one user message and streams the reply into a new bubble (streamReply).
async function generate(text) {
  if (state.controller) return;
  const model = els.model.value;
  const userTurn = { role: 'user', content: text };
  const turns = state.conversation;
  turns.push(userTurn);
  const images = takeImages();
  const userNode = addMessage('user', text);
  showImages(userNode, images.map((url) => ({ url })));
  userNode.dataset.inPrompt = String(Boolean(text)); // as the server will count it, once it is kept
  const node = addMessage('assistant', '');
  setStatus(node, 'Waiting for the model…');

  // Only the new message goes out: the server has the rest of the chat.
  const maxTokens = parseInt(els.maxTokens.value, 10);
  const body = { model, temperature: Number(els.temperature.value) };
  if (text) body.content = text;
  if (images.length) body.images = images;
  if (maxTokens > 0) body.max_tokens = maxTokens;

  const gen = newGeneration(model);
  const reply = { chatId: null, messageId: 0, lastEventId: 0, stopping: false, stored: null };
  await streamReply(node, gen, reply, async (signal) => {
    reply.chatId = await ensureChat(model, signal);
    return api.postMessage(reply.chatId, body, signal);
  });
  const content = node.querySelector('.content');
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
    delete userNode.dataset.inPrompt;
    if (gen.finish === 'stopped') content.replaceChildren(element('p', 'muted', 'Stopped before the first token.'));
    if (!els.prompt.value) {
      els.prompt.value = text;
      autosize();
    }
  }
  scrollToBottom();
  loadModels(); // the model may have been loaded by this request
}

// Streams a reply into its bubble, painting at most once a frame: from the response that
// `open(signal)` gives (null: from the reply's first event, following it), and again from the
// last event it has whenever the stream breaks before the end. However it ends (done, error,
// Stop, a lost connection) the bubble gets data-finish and the reply's figures.
async function streamReply(node, gen, reply, open) {
  const controller = new AbortController();
  state.controller = controller;
  state.reply = reply;
  setStreaming(true);
  node.classList.add('streaming');
  const content = node.querySelector('.content');
  const meta = node.querySelector('.meta');
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
      reply.messageId = data.reply_message_id; // from now on the reply can be followed again, and stopped
      node.dataset.messageId = String(data.reply_message_id);
      if (data.dropped_messages) showContextLimit(data.dropped_messages);
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
    const response = open ? await open(controller.signal) : null;
    const end = await follow(response, reply, onEvent, controller.signal);
    if (end === 'gone') await readStoredReply(reply, gen);
    else if (end === 'lost') gen.error = 'The connection closed before the reply was complete.';
  } catch (err) {
    if (err && err.name === 'AbortError') gen.finish = 'stopped';
    else gen.error = err && err.message === 'Failed to fetch' ? 'Cannot reach the tokenwire bridge.' : String((err && err.message) || err);
  } finally {
    if (frame) cancelAnimationFrame(frame);
    if (state.controller === controller) setStreaming(false); // else another chat took over meanwhile
  }
  if (reply.stopping && (gen.finish === 'cancelled' || !gen.finish)) gen.finish = 'stopped'; // Stop did it
  if (reply.stored && reply.stored.content.length > gen.text.length) gen.text = reply.stored.content;

  // Final paint and bookkeeping.
  setStatus(node, '');
  node.classList.remove('streaming');
  content.innerHTML = renderMarkdown(gen.text);
  node.dataset.finish = gen.error ? 'error' : gen.finish;
  node.dataset.inPrompt = String(Boolean(gen.text || gen.calls.length));
  const statsText = showStats(gen, true);
  if (gen.tokens || gen.usage) meta.replaceChildren(element('span', '', `${gen.model ? `${gen.model} · ` : ''}${statsText}`));
  if (gen.error) showError(node, gen.error);
}
