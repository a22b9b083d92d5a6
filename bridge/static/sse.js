// Server-sent events over fetch(): EventSource cannot POST, so the page reads a text/event-stream
// response body itself. Only the fields the bridge sends are understood: `event`, `data` and
// `id` (a chat reply's event number, sent back as Last-Event-ID to resume after it; `retry` is
// ignored); comment lines (":" heartbeats) are skipped.

/**
 * @typedef {object} ServerSentEvent
 * @property {string} type The `event:` field, or "message" where there was none.
 * @property {string} data The `data:` lines of the event, joined with "\n".
 * @property {string} id The last `id:` field seen in the stream so far (as EventSource's
 *   lastEventId), "" before any.
 */

/**
 * Reads a text/event-stream body and yields its events as they arrive.
 *
 * Lines may end with "\r\n", "\r" or "\n", and may be split anywhere across chunks. An event
 * still open when the body ends is dispatched. Leaving the loop early (`break`, `return`, an
 * exception) cancels the body, and so does reaching its end.
 *
 * @example
 * for await (const { type, data } of readEvents(response.body)) {
 *   if (type === 'done') break;
 * }
 * @param {ReadableStream<Uint8Array>} body A fetch() Response's body.
 * @returns {AsyncGenerator<ServerSentEvent, void, undefined>}
 */
export async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const feed = eventParser();
  let buffer = '';
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      const eol = /\r\n|\r|\n/g;
      let consumed = 0;
      let match;
      while ((match = eol.exec(buffer))) {
        // A lone "\r" at the very end may be half of "\r\n": wait for the next chunk.
        if (!done && match[0] === '\r' && match.index === buffer.length - 1) break;
        const event = feed(buffer.slice(consumed, match.index));
        consumed = eol.lastIndex;
        if (event) yield event;
      }
      buffer = buffer.slice(consumed);
      if (done) {
        if (buffer) feed(buffer); // a last line without its line end (never completes an event)
        const last = feed('');
        if (last) yield last;
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Returns a function that takes the stream's lines one at a time (without their line ends) and
// returns the event that a blank line completes, or null.
function eventParser() {
  let type = '';
  let data = [];
  let id = '';
  return (line) => {
    if (line === '') {
      const event = data.length ? { type: type || 'message', data: data.join('\n'), id } : null;
      type = '';
      data = [];
      return event;
    }
    if (line.startsWith(':')) return null;
    const colon = line.indexOf(':');
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? '' : line.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
    else if (field === 'id' && !value.includes('\0')) id = value;
    return null;
  };
}
