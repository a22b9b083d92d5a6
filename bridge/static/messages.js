// The transcript: message bubbles (the user's shown as typed, the model's as Markdown), their
// status and error lines, and keeping the newest in view.

import { els, element } from './dom.js';
import { renderMarkdown } from './markdown.js';
import { showImages } from './attachments.js';

// A stored reply's status (GET /api/chats/{id}) as the data-finish names that a streamed reply
// gets, and the words shown for it in the bubble's meta line ("complete" shows none).
const STORED_FINISH = { complete: 'stop', length: 'length', stopped: 'stopped', cancelled: 'cancelled', error: 'error', interrupted: 'error', pending: 'pending' };
const STORED_LABELS = { length: 'max tokens reached', stopped: 'stopped', cancelled: 'cancelled', error: 'error', interrupted: 'interrupted', pending: 'being written' };

/**
 * Appends a message bubble to the transcript and scrolls to it; hides the empty-chat welcome.
 *
 * @param {'user'|'assistant'} role
 * @param {string} text The user's text (shown as typed) or the model's Markdown.
 * @returns {HTMLElement} The .message element (with .avatar, .content, .meta inside).
 */
export function addMessage(role, text) {
  els.empty.hidden = true;
  const node = els.template.content.firstElementChild.cloneNode(true);
  node.classList.add(role);
  node.dataset.role = role;
  node.querySelector('.avatar').textContent = role === 'user' ? 'You' : 'AI';
  const content = node.querySelector('.content');
  if (role === 'user') content.textContent = text; // shown as typed, never parsed
  else content.innerHTML = renderMarkdown(text);
  els.messages.append(node);
  scrollToBottom(true);
  return node;
}

/**
 * Shows a message of a stored chat: a system prompt as a note, a user message or a reply as a
 * bubble, the reply with its model, how it ended, its token count and any error.
 *
 * @param {{id: number, role: string, content: string, status?: string, model?: string,
 *          usage?: {completion_tokens?: number}, error_message?: string}} m
 */
export function showStoredMessage(m) {
  if (m.role === 'system') {
    const note = element('div', 'system-note', `System: ${m.content}`);
    note.dataset.testid = 'system-note';
    els.messages.append(note);
    return;
  }
  if (m.role === 'tool') {
    showToolResult(m);
    return;
  }
  const node = addMessage(m.role === 'user' ? 'user' : 'assistant', m.content);
  node.dataset.messageId = String(m.id);
  node.dataset.inPrompt = String(inPrompt(m));
  if (m.images && m.images.length) showImages(node, m.images);
  if (m.role !== 'assistant') return;
  if (m.reasoning) showReasoning(node, m.reasoning);
  if (m.tool_calls && m.tool_calls.length) showToolCalls(node, m.tool_calls);
  node.dataset.finish = STORED_FINISH[m.status] || m.status;
  const parts = [];
  if (m.model) parts.push(m.model);
  if (STORED_LABELS[m.status]) parts.push(STORED_LABELS[m.status]);
  if (m.usage && m.usage.completion_tokens) parts.push(`${m.usage.completion_tokens} tokens`);
  node.querySelector('.meta').replaceChildren(element('span', '', parts.join(' · ')));
  if (m.error_message) showError(node, m.error_message);
}

/**
 * Shows a reply's thinking above its text, folded (a reasoning model's <think> block, which the
 * server keeps apart from the reply).
 *
 * @param {HTMLElement} node A .message element.
 * @param {string} text
 * @returns {HTMLElement} The <details> element (its .reasoning-text grows while streaming).
 */
export function showReasoning(node, text) {
  let box = node.querySelector('.reasoning');
  if (!box) {
    box = element('details', 'reasoning');
    box.append(element('summary', '', 'Thinking'), element('div', 'reasoning-text'));
    node.querySelector('.bubble').insertBefore(box, node.querySelector('.content'));
  }
  box.querySelector('.reasoning-text').textContent = text; // the model's words, never parsed
  return box;
}

/**
 * Shows the tools a reply called, each as its name and its JSON arguments, below its text.
 *
 * @param {HTMLElement} node A .message element.
 * @param {{id: string, function: {name: string, arguments: string}}[]} calls
 */
export function showToolCalls(node, calls) {
  const list = element('div', 'tool-calls');
  for (const call of calls) {
    const item = element('div', 'tool-call');
    item.dataset.testid = 'tool-call';
    item.dataset.callId = call.id;
    item.append(element('span', 'tool-name', `Called ${call.function.name}`), element('pre', 'tool-args', prettyJson(call.function.arguments)));
    list.append(item);
  }
  const old = node.querySelector('.tool-calls');
  if (old) old.replaceWith(list);
  else node.querySelector('.bubble').insertBefore(list, node.querySelector('.meta'));
}

/**
 * Shows a tool's result (a "tool" message) as a note under the call it answers.
 *
 * @param {{id: number, content: string, name?: string, tool_call_id?: string}} m
 */
export function showToolResult(m) {
  els.empty.hidden = true;
  const note = element('div', 'tool-result');
  note.dataset.testid = 'tool-result';
  note.dataset.messageId = String(m.id);
  note.dataset.inPrompt = 'true';
  if (m.tool_call_id) note.dataset.callId = m.tool_call_id;
  note.append(element('span', 'tool-name', `Result of ${m.name || 'a tool'}`), element('pre', 'tool-output', m.content));
  els.messages.append(note);
}

/**
 * Whether a stored message is one a turn's prompt holds, as the server counts them
 * (server/chats/store.py, _turn_context): not the system prompt (always kept, never counted),
 * not a reply still being written, not an empty one (a reply stopped before its first token).
 *
 * @param {{role: string, content: string, status?: string, tool_calls?: object[]}} m
 * @returns {boolean}
 */
export function inPrompt(m) {
  if (m.role === 'system' || m.status === 'pending') return false;
  return Boolean(m.content || (m.tool_calls && m.tool_calls.length) || m.role === 'tool');
}

/**
 * Marks where the model's view of the chat begins. Once a chat outgrows the context window the
 * server leaves its oldest turns out of the prompt (the reply says how many messages:
 * `dropped_messages`); a divider goes after the last of them, among the messages marked
 * data-in-prompt, and the one shown before goes. 0 only removes it.
 *
 * @param {number} dropped
 */
export function showContextLimit(dropped) {
  for (const old of els.messages.querySelectorAll('.context-divider')) old.remove();
  const counted = els.messages.querySelectorAll('[data-in-prompt="true"]');
  const last = dropped > 0 ? counted[Math.min(dropped, counted.length) - 1] : null;
  if (!last) return;
  const words = dropped === 1 ? 'message' : `${dropped} messages`;
  const divider = element('div', 'context-divider', `The model no longer sees the ${words} above: the chat outgrew its context window.`);
  divider.dataset.testid = 'context-divider';
  divider.dataset.dropped = String(dropped);
  divider.setAttribute('role', 'separator');
  last.after(divider);
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;
  }
}

/**
 * Marks a reply as failed and shows the error in its bubble, above the meta line.
 *
 * @param {HTMLElement} node A .message element.
 * @param {string} message
 */
export function showError(node, message) {
  node.classList.add('failed');
  node.querySelector('.bubble').insertBefore(element('div', 'error-box', message), node.querySelector('.meta'));
}

/**
 * Sets the status line at the top of a bubble (a spinner and a text); "" removes it.
 *
 * @param {HTMLElement} node A .message element.
 * @param {string} text
 */
export function setStatus(node, text) {
  let status = node.querySelector('.status');
  if (!text) {
    if (status) status.remove();
    return;
  }
  if (!status) {
    status = element('div', 'status');
    status.append(element('span', 'spinner'), element('span', 'status-text'));
    node.querySelector('.bubble').insertBefore(status, node.querySelector('.content'));
  }
  status.querySelector('.status-text').textContent = text;
}

/** Removes every message and system note from the transcript. */
export function clearTranscript() {
  for (const node of els.messages.querySelectorAll('.message, .system-note, .tool-result, .context-divider')) node.remove();
}

function nearBottom() {
  const s = els.scroller;
  return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
}

/**
 * Scrolls the transcript to its end, unless the reader has scrolled up (`force` scrolls anyway).
 *
 * @param {boolean} [force]
 */
export function scrollToBottom(force = false) {
  if (force || nearBottom()) els.scroller.scrollTop = els.scroller.scrollHeight;
}
