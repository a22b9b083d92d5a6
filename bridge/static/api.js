// The bridge's HTTP API as the page uses it: the model list, the chats the server keeps, and
// posting a message to a chat (its reply is a text/event-stream, read with sse.js), following a
// reply again and stopping it.
// No DOM here. A non-2xx answer becomes an ApiError carrying the bridge's own error message.

/** A non-2xx answer from the bridge. */
export class ApiError extends Error {
  /**
   * @param {string} message The bridge's error message, or the HTTP status line.
   * @param {number} status The HTTP status code.
   */
  constructor(message, status) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
  }
}

/**
 * A response's JSON body, or null where it has none or it is not JSON.
 *
 * @param {Response} response
 * @returns {Promise<any>}
 */
export async function readJson(response) {
  try {
    return await response.json();
  } catch {
    return null;
  }
}

/**
 * The message to show for a failed response: the bridge's `error.message` (or a bare `error`
 * string) where the body has one, else the status line.
 *
 * @param {any} body The response's JSON body (null if none).
 * @param {Response} response
 * @returns {string}
 */
export function errorMessage(body, response) {
  const message = body && body.error && (body.error.message || body.error);
  if (message) return String(message);
  return `${response.status} ${response.statusText || 'error'}`.trim();
}

/**
 * Calls a JSON endpoint of the bridge.
 *
 * @param {string} path Path and query, e.g. "/api/chats?limit=100".
 * @param {RequestInit} [options] fetch() options; a `body` (a JSON string) is sent as application/json.
 * @returns {Promise<any>} The JSON body (null if the answer had none).
 * @throws {ApiError} On a non-2xx answer; fetch()'s own errors (offline, aborted) pass through.
 */
export async function request(path, options = {}) {
  const response = await fetch(path, {
    ...options,
    headers: { Accept: 'application/json', ...(options.body ? { 'Content-Type': 'application/json' } : {}), ...authHeaders() },
  });
  const body = await readJson(response);
  unauthorized(response);
  if (!response.ok) throw new ApiError(errorMessage(body, response), response.status);
  return body;
}

const chatPath = (id) => `/api/chats/${encodeURIComponent(id)}`;

const KEY_STORAGE = 'tokenwire.apiKey';

/**
 * The API key this tab signed in with (session storage: gone when the tab closes), or "".
 *
 * @returns {string}
 */
export function apiKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) || '';
  } catch {
    return '';
  }
}

/**
 * Keeps (or, with "", forgets) the API key for this tab's requests.
 *
 * @param {string} key
 */
export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** The Authorization header of every request, when the tab has a key. */
function authHeaders() {
  const key = apiKey();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

/** A 401: the server wants a key (or this one is wrong); the page's sign-in box listens. */
function unauthorized(response) {
  if (response.status === 401) window.dispatchEvent(new CustomEvent('tokenwire:unauthorized'));
}

/**
 * The server's models: GET /api/models.
 *
 * @returns {Promise<object[]>} The `models` list (empty if the body had none).
 */
export async function listModels() {
  const body = await request('/api/models');
  return (body && body.models) || [];
}

/**
 * The most recently updated chats: GET /api/chats.
 *
 * @param {number} [limit]
 * @returns {Promise<object[]>} The `chats` list.
 */
export async function listChats(limit = 100) {
  return (await request(`/api/chats?limit=${limit}`)).chats;
}

/**
 * Chats that match a full-text query: GET /api/chats/search.
 *
 * @param {string} query
 * @returns {Promise<object[]>} The `results`: `{chat, snippets}` entries.
 */
export async function searchChats(query) {
  return (await request(`/api/chats/search?q=${encodeURIComponent(query)}`)).results;
}

/**
 * One chat with its messages: GET /api/chats/{id}.
 *
 * @param {string} id
 * @returns {Promise<{chat: object, messages: object[]}>}
 */
export function getChat(id) {
  return request(chatPath(id));
}

/**
 * Creates an empty chat: POST /api/chats.
 *
 * @param {{model: string, system: string}} chat The model and the system prompt ("" for none).
 * @param {AbortSignal} [signal]
 * @returns {Promise<object>} The new chat (with its `id`).
 */
export function createChat({ model, system }, signal) {
  return request('/api/chats', { method: 'POST', body: JSON.stringify({ model, system }), signal });
}

/**
 * Renames a chat: PATCH /api/chats/{id}.
 *
 * @param {string} id
 * @param {string} title
 * @returns {Promise<object>}
 */
export function renameChat(id, title) {
  return request(chatPath(id), { method: 'PATCH', body: JSON.stringify({ title }) });
}

/**
 * Deletes a chat: DELETE /api/chats/{id}.
 *
 * @param {string} id
 * @returns {Promise<any>}
 */
export function deleteChat(id) {
  return request(chatPath(id), { method: 'DELETE' });
}

/**
 * Posts the next user message to a chat: POST /api/chats/{id}/messages. The server adds the
 * chat's earlier messages itself.
 *
 * @param {string} chatId
 * @param {{content: string, model: string, temperature: number, max_tokens?: number}} message
 * @param {AbortSignal} [signal] Aborting it only drops the stream: the server goes on writing the
 *   reply (follow it again with watchReply, stop it with stopReply).
 * @returns {Promise<Response>} The 2xx response; read its body with sse.js's readEvents.
 * @throws {ApiError} On a non-2xx answer.
 */
export async function postMessage(chatId, message, signal) {
  const response = await fetch(`${chatPath(chatId)}/messages`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream', ...authHeaders() },
    body: JSON.stringify(message),
    signal,
  });
  unauthorized(response);
  if (!response.ok) throw new ApiError(errorMessage(await readJson(response), response), response.status);
  return response;
}

const replyPath = (chatId, messageId) => `${chatPath(chatId)}/messages/${encodeURIComponent(messageId)}`;

/**
 * Follows a reply being written again: GET /api/chats/{id}/messages/{message_id}/events. The
 * server keeps writing a reply when the page loses its stream; this picks it up after event
 * `lastEventId` (0: from the start, the text so far first).
 *
 * @param {string} chatId
 * @param {number} messageId The reply's message id (the `chat` event's reply_message_id).
 * @param {number} lastEventId The `id:` of the last event the page has.
 * @param {AbortSignal} [signal] Aborting it only stops following; the reply goes on.
 * @returns {Promise<Response>} The 2xx response; read its body with sse.js's readEvents.
 * @throws {ApiError} On a non-2xx answer (409: the reply has ended; read the chat).
 */
export async function watchReply(chatId, messageId, lastEventId, signal) {
  const headers = { Accept: 'text/event-stream', ...authHeaders() };
  if (lastEventId > 0) headers['Last-Event-ID'] = String(lastEventId);
  const response = await fetch(`${replyPath(chatId, messageId)}/events`, { headers, signal });
  unauthorized(response);
  if (!response.ok) throw new ApiError(errorMessage(await readJson(response), response), response.status);
  return response;
}

/**
 * Stops a reply being written, at once: POST /api/chats/{id}/messages/{message_id}/stop.
 *
 * @param {string} chatId
 * @param {number} messageId
 * @returns {Promise<object>} The reply as stored (status "stopped", or how it had ended).
 */
export function stopReply(chatId, messageId) {
  return request(`${replyPath(chatId, messageId)}/stop`, { method: 'POST' });
}

/**
 * Speech to text: POST /v1/audio/transcriptions with a recording (the server's speech model).
 *
 * @param {Blob} audio The recording (webm/opus, ogg, m4a, wav…).
 * @param {string} filename Its name, whose extension hints at the format.
 * @returns {Promise<string>} The transcript.
 * @throws {ApiError} On a non-2xx answer (413: too long; 400: not audio; 404: no speech model).
 */
export async function transcribe(audio, filename) {
  const form = new FormData();
  form.append('model', 'whisper-1');
  form.append('response_format', 'json');
  form.append('file', audio, filename);
  const response = await fetch('/v1/audio/transcriptions', {
    method: 'POST',
    body: form,
    headers: { Accept: 'application/json', ...authHeaders() },
  });
  const body = await readJson(response);
  unauthorized(response);
  if (!response.ok) throw new ApiError(errorMessage(body, response), response.status);
  return (body && body.text) || '';
}
