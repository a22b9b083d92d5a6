// tokenwire web chat: plain JavaScript, no build step, no third-party code.
//
// Talks to the bridge: GET /api/models, /api/chats (the server keeps every chat), and
// POST /api/chats/{id}/messages (a text/event-stream body read with a ReadableStream reader, since
// EventSource cannot POST). A chat is created on the server with its first message; after that the
// page sends only the new message and the server supplies the context. The sidebar lists past
// chats (open, continue, rename, delete, search). Model output is rendered with the small Markdown
// renderer below, which escapes all HTML before it adds any tag of its own.
'use strict';

// ---- Markdown (safe subset) --------------------------------------------------------------------
//
// Paragraphs, headings, **bold**, *italic*, ~~strike~~, `code`, fenced code blocks, lists (nested),
// block quotes, rules, simple tables, [links](https://…) and bare http(s) URLs. Every piece of
// source text goes through escapeHtml before any tag is added, and links accept http(s) only, so
// the output never contains markup that the model wrote.
const Markdown = (() => {
  const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
  const escapeHtml = (s) => String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);

  const FENCE_RE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
  const HEADING_RE = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
  const RULE_RE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
  const QUOTE_RE = /^ {0,3}>\s?(.*)$/;
  const LIST_RE = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
  const TABLE_SEP_RE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
  const PLACEHOLDER = '\u0000';

  const indentOf = (line) => line.match(/^\s*/)[0].replace(/\t/g, '    ').length;
  const isBlank = (line) => line.trim() === '';

  // Inline formatting of one run of text. `raw` is source text; the result is safe HTML: code
  // spans and links are cut out of the raw text first (their pieces escaped on their own), the
  // rest is escaped whole, and only then do the emphasis rules add tags.
  function inline(raw) {
    const slots = [];
    const keep = (html) => `${PLACEHOLDER}${slots.push(html) - 1}${PLACEHOLDER}`;
    const link = (url, html) => keep(`<a href="${escapeHtml(url)}" target="_blank" rel="noopener noreferrer nofollow">${html}</a>`);
    let s = String(raw);
    s = s.replace(/(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/g, (_, __, code) => keep(`<code>${escapeHtml(code.trim() || code)}</code>`));
    s = s.replace(/\[([^\]\n]+)\]\((https?:\/\/[^\s()<>"'`]+)(?:\s+"[^"\n]*")?\)/gi, (_, text, url) => link(url, emphasis(escapeHtml(text))));
    s = s.replace(/\bhttps?:\/\/[^\s<>"'`\u0000]*[^\s<>"'`\u0000.,:;!?)\]]/gi, (url) => link(url, escapeHtml(url)));
    s = emphasis(escapeHtml(s));
    const restore = (text) => text.replace(/\u0000(\d+)\u0000/g, (_, i) => restore(slots[Number(i)]));
    return restore(s);
  }

  // Emphasis on text that is already escaped.
  function emphasis(s) {
    return s
      .replace(/\*\*(?=\S)([\s\S]*?\S)\*\*/g, '<strong>$1</strong>')
      .replace(/(^|[^\w])__(?=\S)([\s\S]*?\S)__(?!\w)/g, '$1<strong>$2</strong>')
      .replace(/(^|[^*\w])\*([^\s*](?:[^*\n]*?[^\s*])?)\*(?![*\w])/g, '$1<em>$2</em>')
      .replace(/(^|[^\w])_([^\s_](?:[^_\n]*?[^\s_])?)_(?!\w)/g, '$1<em>$2</em>')
      .replace(/~~(?=\S)([\s\S]*?\S)~~/g, '<del>$1</del>');
  }

  function splitRow(line) {
    let row = line.trim();
    if (row.startsWith('|')) row = row.slice(1);
    if (row.endsWith('|')) row = row.slice(0, -1);
    return row.split('|').map((cell) => cell.trim());
  }

  function startsBlock(line) {
    return FENCE_RE.test(line) || HEADING_RE.test(line) || RULE_RE.test(line) || QUOTE_RE.test(line) || LIST_RE.test(line);
  }

  function renderList(lines, start) {
    const first = lines[start].match(LIST_RE);
    const ordered = /\d/.test(first[2]);
    const base = indentOf(first[1]);
    const items = [];
    let i = start;
    while (i < lines.length) {
      const line = lines[i];
      const m = line.match(LIST_RE);
      if (m && indentOf(m[1]) <= base + 1) {
        if (/\d/.test(m[2]) !== ordered) break; // another kind of list begins
        items.push([m[3]]);
        i++;
        continue;
      }
      if (isBlank(line)) {
        let j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j++;
        const next = lines[j];
        const nextItem = next !== undefined && next.match(LIST_RE);
        const continues = next !== undefined && (indentOf(next) > base + 1 ||
          (nextItem && indentOf(nextItem[1]) <= base + 1 && /\d/.test(nextItem[2]) === ordered));
        if (!continues) break;
        if (indentOf(next) > base + 1) items[items.length - 1].push('');
        i = j;
        continue;
      }
      if (indentOf(line) > base) {
        items[items.length - 1].push(line.replace(/^\s+/, (ws) => ' '.repeat(Math.max(0, indentOf(ws) - base - 2))));
        i++;
        continue;
      }
      if (!startsBlock(line)) { // lazy continuation of the item's text
        items[items.length - 1].push(line);
        i++;
        continue;
      }
      break;
    }
    const startNumber = ordered ? parseInt(first[2], 10) : 1;
    const open = ordered ? (startNumber !== 1 ? `<ol start="${startNumber}">` : '<ol>') : '<ul>';
    const body = items.map((item) => `<li>${renderBlocks(item, true)}</li>`).join('');
    return { html: `${open}${body}${ordered ? '</ol>' : '</ul>'}`, next: i };
  }

  // Renders source lines as blocks. `tight`: a lone paragraph comes out without <p> (list items).
  function renderBlocks(lines, tight = false) {
    const out = [];
    let para = [];
    const flush = () => {
      if (para.length) out.push({ p: true, html: para.map((l) => inline(l.trim())).join('<br>') });
      para = [];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      let m;
      if (isBlank(line)) { flush(); i++; continue; }
      if ((m = line.match(FENCE_RE))) {
        flush();
        const fence = m[1];
        const lang = m[2];
        const closing = new RegExp(`^ {0,3}${fence[0] === '`' ? '`' : '~'}{${fence.length},}\\s*$`);
        const code = [];
        i++;
        while (i < lines.length && !closing.test(lines[i])) code.push(lines[i++]);
        i++; // the closing fence (absent while a reply is still streaming)
        const label = lang ? `<span class="code-lang">${escapeHtml(lang)}</span>` : '<span class="code-lang">code</span>';
        out.push({ html: `<div class="code-block"><div class="code-head">${label}<button type="button" class="copy-code">Copy</button></div>` +
          `<pre><code${lang ? ` data-lang="${escapeHtml(lang)}"` : ''}>${escapeHtml(code.join('\n'))}</code></pre></div>` });
        continue;
      }
      if ((m = line.match(HEADING_RE))) {
        flush();
        const level = m[1].length;
        out.push({ html: `<h${level}>${inline(m[2])}</h${level}>` });
        i++;
        continue;
      }
      if (RULE_RE.test(line)) { flush(); out.push({ html: '<hr>' }); i++; continue; }
      if (QUOTE_RE.test(line)) {
        flush();
        const quoted = [];
        while (i < lines.length && (m = lines[i].match(QUOTE_RE))) { quoted.push(m[1]); i++; }
        out.push({ html: `<blockquote>${renderBlocks(quoted)}</blockquote>` });
        continue;
      }
      if (LIST_RE.test(line) && !(para.length && /^\s*\d/.test(line) && !/^\s*1[.)]/.test(line))) {
        flush();
        const list = renderList(lines, i);
        out.push({ html: list.html });
        i = list.next;
        continue;
      }
      if (line.includes('|') && i + 1 < lines.length && TABLE_SEP_RE.test(lines[i + 1]) && lines[i + 1].includes('-')) {
        flush();
        const head = splitRow(line);
        const aligns = splitRow(lines[i + 1]).map((c) => (c.startsWith(':') && c.endsWith(':') ? 'center' : c.endsWith(':') ? 'right' : ''));
        const cell = (tag, text, k) => `<${tag}${aligns[k] ? ` style="text-align:${aligns[k]}"` : ''}>${inline(text)}</${tag}>`;
        let html = `<div class="table-wrap"><table><thead><tr>${head.map((c, k) => cell('th', c, k)).join('')}</tr></thead><tbody>`;
        i += 2;
        while (i < lines.length && lines[i].includes('|') && !isBlank(lines[i])) {
          const row = splitRow(lines[i]);
          html += `<tr>${head.map((_, k) => cell('td', row[k] || '', k)).join('')}</tr>`;
          i++;
        }
        out.push({ html: `${html}</tbody></table></div>` });
        continue;
      }
      para.push(line);
      i++;
    }
    flush();
    if (tight && out.length === 1 && out[0].p) return out[0].html;
    if (tight && out.length > 1 && out[0].p) {
      return out[0].html + out.slice(1).map((b) => (b.p ? `<p>${b.html}</p>` : b.html)).join('');
    }
    return out.map((b) => (b.p ? `<p>${b.html}</p>` : b.html)).join('');
  }

  function render(source) {
    const text = String(source).replace(/\u0000/g, '\uFFFD').replace(/\r\n?/g, '\n');
    return renderBlocks(text.split('\n'));
  }

  return { render, escapeHtml };
})();

// ---- Server-sent events over fetch -------------------------------------------------------------

// Reads a text/event-stream body and calls onEvent(type, data) for each event. Comment lines
// (":" heartbeats) are skipped. Returns when the body ends or onEvent returns false.
async function readEventStream(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = '';
  let type = '';
  let data = [];
  const line = (text) => {
    if (text === '') {
      if (data.length) {
        const keepGoing = onEvent(type || 'message', data.join('\n'));
        type = '';
        data = [];
        return keepGoing !== false;
      }
      type = '';
      return true;
    }
    if (text.startsWith(':')) return true;
    const colon = text.indexOf(':');
    const field = colon < 0 ? text : text.slice(0, colon);
    let value = colon < 0 ? '' : text.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'event') type = value;
    else if (field === 'data') data.push(value);
    return true;
  };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      buffer += done ? decoder.decode() : decoder.decode(value, { stream: true });
      let match;
      const eol = /\r\n|\r|\n/g;
      let consumed = 0;
      while ((match = eol.exec(buffer))) {
        // A lone "\r" at the very end may be half of "\r\n": wait for the next chunk.
        if (!done && match[0] === '\r' && match.index === buffer.length - 1) break;
        if (!line(buffer.slice(consumed, match.index))) return;
        consumed = eol.lastIndex;
      }
      buffer = buffer.slice(consumed);
      if (done) {
        if (buffer) line(buffer);
        line('');
        return;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// ---- the page ----------------------------------------------------------------------------------

(() => {
  const $ = (selector) => document.querySelector(selector);
  const els = {
    body: document.body,
    model: $('#model-select'),
    modelInfo: $('#model-info'),
    messages: $('#messages'),
    scroller: $('#scroller'),
    empty: $('#empty'),
    composer: $('#composer'),
    prompt: $('#prompt'),
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

  const SETTINGS_KEY = 'tokenwire.settings.v1';
  const wide = window.matchMedia('(min-width: 1100px)');
  const state = {
    models: [],
    conversation: [], // [{role, content}] of the open chat, as the server keeps it
    controller: null,
    chatId: null, // the open chat on the server; null: a new chat, created with its first message
    chats: [], // the sidebar's list
    searchTimer: 0,
    searchSeq: 0,
  };

  // -- small helpers

  function humanBytes(n) {
    let value = Number(n) || 0;
    for (const unit of ['B', 'KB', 'MB', 'GB', 'TB']) {
      if (value < 1024 || unit === 'TB') return unit === 'B' ? `${value} B` : `${value.toFixed(value < 10 ? 1 : 0)} ${unit}`;
      value /= 1024;
    }
    return String(n);
  }

  function humanCount(n) {
    const value = Number(n) || 0;
    if (value >= 1e9) return `${(value / 1e9).toFixed(1)}B`;
    if (value >= 1e6) return `${Math.round(value / 1e6)}M`;
    if (value >= 1e3) return `${Math.round(value / 1e3)}K`;
    return String(value);
  }

  const modelState = (m) => String(m.state || (m.loaded ? 'loaded' : 'available')).replace(/^MODEL_STATE_/, '').toLowerCase();
  const finishName = (reason) => String(reason || '').replace(/^FINISH_REASON_/, '').toLowerCase() || 'done';
  const FINISH_LABELS = { stop: 'complete', length: 'max tokens reached', stopped: 'stopped', cancelled: 'cancelled', error: 'error' };

  async function readJson(response) {
    try {
      return await response.json();
    } catch {
      return null;
    }
  }

  function errorMessage(body, response) {
    const message = body && body.error && (body.error.message || body.error);
    if (message) return String(message);
    return `${response.status} ${response.statusText || 'error'}`.trim();
  }

  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // -- settings

  function loadSettings() {
    let saved = {};
    try {
      saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) || '{}') || {};
    } catch {
      saved = {};
    }
    if (typeof saved.temperature === 'number') els.temperature.value = String(saved.temperature);
    if (Number.isInteger(saved.maxTokens) && saved.maxTokens > 0) els.maxTokens.value = String(saved.maxTokens);
    if (typeof saved.system === 'string') els.system.value = saved.system;
    state.savedModel = typeof saved.model === 'string' ? saved.model : '';
    showTemperature();
  }

  function saveSettings() {
    const settings = {
      temperature: Number(els.temperature.value),
      maxTokens: parseInt(els.maxTokens.value, 10) || undefined,
      system: els.system.value,
      model: els.model.value || state.savedModel || '',
    };
    try {
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
    } catch {
      /* private mode: settings last for this tab only */
    }
  }

  function showTemperature() {
    const t = Number(els.temperature.value);
    els.temperatureValue.textContent = t === 0 ? '0 (greedy)' : t.toFixed(2);
  }

  function toggleSettings(open) {
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

  // -- models

  async function loadModels() {
    try {
      const response = await fetch('/api/models', { headers: { Accept: 'application/json' } });
      const body = await readJson(response);
      if (!response.ok) throw new Error(errorMessage(body, response));
      state.models = (body && body.models) || [];
      renderModels();
    } catch (err) {
      if (state.models.length) return; // keep the list we have
      els.model.replaceChildren(new Option('No models: server unreachable', ''));
      els.model.disabled = true;
      els.modelInfo.replaceChildren(element('p', 'error-text', `Could not load the model list: ${err.message}`));
      els.body.dataset.models = 'error';
    }
  }

  function renderModels() {
    const current = els.model.value || state.savedModel;
    const usable = state.models.filter((m) => modelState(m) !== 'failed');
    els.model.replaceChildren();
    if (!state.models.length) {
      els.model.append(new Option('No models in the store', ''));
      els.model.disabled = true;
      els.modelInfo.replaceChildren(element('p', 'muted', 'The server has no models. Run `tokenwire pull smollm2-135m`.'));
      els.body.dataset.models = 'empty';
      return;
    }
    for (const m of state.models) {
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

  function renderModelInfo() {
    const m = state.models.find((x) => x.id === els.model.value);
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

  // -- messages

  function addMessage(role, text) {
    els.empty.hidden = true;
    const node = els.template.content.firstElementChild.cloneNode(true);
    node.classList.add(role);
    node.dataset.role = role;
    node.querySelector('.avatar').textContent = role === 'user' ? 'You' : 'AI';
    const content = node.querySelector('.content');
    if (role === 'user') content.textContent = text; // shown as typed, never parsed
    else content.innerHTML = Markdown.render(text);
    els.messages.append(node);
    scrollToBottom(true);
    return node;
  }

  function nearBottom() {
    const s = els.scroller;
    return s.scrollHeight - s.scrollTop - s.clientHeight < 80;
  }

  function scrollToBottom(force = false) {
    if (force || nearBottom()) els.scroller.scrollTop = els.scroller.scrollHeight;
  }

  function setStatus(node, text) {
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

  // -- generation

  function setStreaming(on) {
    els.body.dataset.state = on ? 'streaming' : 'idle';
    els.send.hidden = on;
    els.stop.hidden = !on;
    els.model.disabled = on || !state.models.length;
    if (!on) state.controller = null;
  }

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

  function showStats(gen, final) {
    const finish = final ? (gen.error ? 'error' : gen.finish || 'done') : '';
    const label = final ? FINISH_LABELS[finish] || finish : gen.tokens ? 'streaming' : 'waiting';
    const figures = final && gen.error && !gen.tokens ? [] : final ? finalFigures(gen) : liveFigures(gen);
    const text = [label, ...figures].join(' · ');
    els.stats.textContent = text;
    els.stats.dataset.finish = finish;
    els.stats.dataset.source = final && gen.usage ? 'server' : 'client';
    return text;
  }

  async function generate(text) {
    if (state.controller) return;
    const model = els.model.value;
    const userTurn = { role: 'user', content: text };
    const conversation = state.conversation;
    conversation.push(userTurn);
    const userNode = addMessage('user', text);
    const node = addMessage('assistant', '');
    node.classList.add('streaming');
    const content = node.querySelector('.content');
    const meta = node.querySelector('.meta');
    setStatus(node, 'Waiting for the model…');

    // Only the new message goes out: the server has the rest of the chat.
    const maxTokens = parseInt(els.maxTokens.value, 10);
    const body = { content: text, model, temperature: Number(els.temperature.value) };
    if (maxTokens > 0) body.max_tokens = maxTokens;

    const controller = new AbortController();
    state.controller = controller;
    setStreaming(true);
    const gen = { startedAt: performance.now(), firstAt: null, lastAt: null, tokens: 0, text: '', finish: '', usage: null, error: '', model };
    showStats(gen, false);

    let frame = 0;
    const paint = () => {
      frame = 0;
      content.innerHTML = Markdown.render(gen.text);
      showStats(gen, false);
      scrollToBottom();
    };
    const schedulePaint = () => {
      if (!frame) frame = requestAnimationFrame(paint);
    };

    try {
      const chatId = await ensureChat(model, controller.signal);
      const response = await fetch(`/api/chats/${encodeURIComponent(chatId)}/messages`, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json', Accept: 'text/event-stream' },
        body: JSON.stringify(body),
        signal: controller.signal,
      });
      if (!response.ok) throw new Error(errorMessage(await readJson(response), response));
      if (!response.body) throw new Error('This browser cannot read streamed responses.');
      await readEventStream(response.body, (type, raw) => {
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
          els.stats.textContent = `waiting · position ${data.position} in the queue`;
        } else if (type === 'token') {
          const now = performance.now();
          if (gen.firstAt === null) {
            gen.firstAt = now;
            setStatus(node, '');
          }
          gen.lastAt = now;
          gen.tokens += 1;
          gen.text += data.text || '';
          schedulePaint();
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
      });
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
    content.innerHTML = Markdown.render(gen.text);
    node.dataset.finish = gen.error ? 'error' : gen.finish;
    const statsText = showStats(gen, true);
    if (gen.tokens || gen.usage) meta.replaceChildren(element('span', '', `${gen.model ? `${gen.model} · ` : ''}${statsText}`));
    if (gen.error) {
      node.classList.add('failed');
      node.querySelector('.bubble').insertBefore(element('div', 'error-box', gen.error), meta);
    }
    if (state.conversation !== conversation) return; // "New chat" was pressed meanwhile
    loadChats(); // a new chat, a new title, a new order
    if (gen.text) {
      conversation.push({ role: 'assistant', content: gen.text });
    } else if (gen.chat) {
      // The server kept the message (and an empty reply): it stays in the chat as it is.
      userNode.classList.add('unanswered');
      if (gen.finish === 'stopped') content.replaceChildren(element('p', 'muted', 'Stopped before the first token.'));
    } else {
      // Nothing came back: the turn is not part of the conversation. Offer the text again.
      conversation.splice(conversation.indexOf(userTurn), 1);
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

  function submit() {
    const text = els.prompt.value.trim();
    if (!text || state.controller) return;
    if (!els.model.value && state.models.length) return;
    els.prompt.value = '';
    autosize();
    generate(text);
  }

  function clearMessages() {
    if (state.controller) state.controller.abort();
    state.conversation = [];
    for (const node of els.messages.querySelectorAll('.message, .system-note')) node.remove();
    els.stats.textContent = '';
    els.stats.dataset.finish = '';
  }

  function newChat() {
    clearMessages();
    setOpenChat(null);
    els.empty.hidden = false;
    els.prompt.focus();
  }

  // -- chats kept by the server (the sidebar)

  async function api(path, options = {}) {
    const response = await fetch(path, {
      ...options,
      headers: { Accept: 'application/json', ...(options.body ? { 'Content-Type': 'application/json' } : {}) },
    });
    const body = await readJson(response);
    if (!response.ok) {
      const error = new Error(errorMessage(body, response));
      error.status = response.status;
      throw error;
    }
    return body;
  }

  // The open chat's id, or a new one made on the server with the chat's first message.
  async function ensureChat(model, signal) {
    if (state.chatId) return state.chatId;
    const system = els.system.value.trim();
    const chat = await api('/api/chats', { method: 'POST', body: JSON.stringify({ model, system }), signal });
    setOpenChat(chat.id);
    return chat.id;
  }

  function setOpenChat(id) {
    state.chatId = id;
    const url = id ? `#chat=${id}` : `${location.pathname}${location.search}`;
    history.replaceState(null, '', url);
    for (const item of els.chatList.querySelectorAll('.chat-item')) {
      if (item.dataset.chatId === id) item.setAttribute('aria-current', 'true');
      else item.removeAttribute('aria-current');
    }
  }

  const STORED_FINISH = { complete: 'stop', length: 'length', stopped: 'stopped', cancelled: 'cancelled', error: 'error', interrupted: 'error', pending: 'pending' };
  const STORED_LABELS = { length: 'max tokens reached', stopped: 'stopped', cancelled: 'cancelled', error: 'error', interrupted: 'interrupted', pending: 'being written' };

  function showStoredMessage(m) {
    if (m.role === 'system') {
      const note = element('div', 'system-note', `System: ${m.content}`);
      note.dataset.testid = 'system-note';
      els.messages.append(note);
      return;
    }
    const node = addMessage(m.role === 'user' ? 'user' : 'assistant', m.content);
    node.dataset.messageId = String(m.id);
    if (m.role !== 'assistant') return;
    node.dataset.finish = STORED_FINISH[m.status] || m.status;
    const parts = [];
    if (m.model) parts.push(m.model);
    if (STORED_LABELS[m.status]) parts.push(STORED_LABELS[m.status]);
    if (m.usage && m.usage.completion_tokens) parts.push(`${m.usage.completion_tokens} tokens`);
    node.querySelector('.meta').replaceChildren(element('span', '', parts.join(' · ')));
    if (m.error_message) {
      node.classList.add('failed');
      node.querySelector('.bubble').insertBefore(element('div', 'error-box', m.error_message), node.querySelector('.meta'));
    }
  }

  async function openChat(id) {
    let chat;
    try {
      chat = await api(`/api/chats/${encodeURIComponent(id)}`);
    } catch (err) {
      els.chatListStatus.textContent = err.status === 404 ? 'That chat no longer exists.' : `Could not open the chat: ${err.message}`;
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
    const model = chat.chat.model;
    if (model && state.models.some((m) => m.id === model && modelState(m) !== 'failed')) {
      els.model.value = model;
      renderModelInfo();
    }
    setOpenChat(chat.chat.id);
    els.chatListStatus.textContent = '';
    if (!wide.matches) toggleHistory(false);
    scrollToBottom(true);
  }

  function whenText(ms) {
    const date = new Date(ms);
    const now = new Date();
    if (date.toDateString() === now.toDateString()) return date.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
    return date.toLocaleDateString([], { year: date.getFullYear() === now.getFullYear() ? undefined : 'numeric', month: 'short', day: 'numeric' });
  }

  function snippetNode(snippet) {
    const line = element('span', 'chat-snippet');
    line.append(`${snippet.role === 'user' ? 'You' : snippet.role === 'assistant' ? 'AI' : 'System'}: `);
    for (const span of snippet.spans) line.append(span.highlighted ? element('mark', '', span.text) : span.text);
    return line;
  }

  function renderChatList(entries) {
    const items = entries.map((entry) => {
      const chat = entry.chat || entry;
      const item = els.chatItemTemplate.content.firstElementChild.cloneNode(true);
      item.dataset.chatId = chat.id;
      item.querySelector('.chat-title').textContent = chat.title || 'Untitled chat';
      item.querySelector('.chat-when').textContent = whenText(chat.updated_ms);
      if (entry.snippets) item.querySelector('.chat-snippets').append(...entry.snippets.map(snippetNode));
      if (chat.id === state.chatId) item.setAttribute('aria-current', 'true');
      return item;
    });
    els.chatList.replaceChildren(...items);
  }

  async function loadChats() {
    const query = els.chatSearch.value.trim();
    const seq = ++state.searchSeq;
    try {
      const body = query
        ? await api(`/api/chats/search?q=${encodeURIComponent(query)}`)
        : await api('/api/chats?limit=100');
      if (seq !== state.searchSeq) return; // a newer search answered first
      const entries = query ? body.results : body.chats;
      renderChatList(entries);
      els.chatListStatus.textContent = entries.length ? '' : query ? 'No chats match.' : 'No chats yet.';
      els.history.dataset.loaded = query ? 'search' : 'list';
    } catch (err) {
      if (seq !== state.searchSeq) return;
      els.chatListStatus.textContent = `Could not load chats: ${err.message}`;
      els.history.dataset.loaded = 'error';
    }
  }

  function startRename(item) {
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
          await api(`/api/chats/${encodeURIComponent(item.dataset.chatId)}`, { method: 'PATCH', body: JSON.stringify({ title }) });
        } catch (err) {
          els.chatListStatus.textContent = `Could not rename: ${err.message}`;
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

  async function deleteChat(id) {
    try {
      await api(`/api/chats/${encodeURIComponent(id)}`, { method: 'DELETE' });
    } catch (err) {
      if (err.status !== 404) {
        els.chatListStatus.textContent = `Could not delete: ${err.message}`;
        return;
      }
    }
    if (state.chatId === id) newChat();
    loadChats();
  }

  function toggleHistory(open) {
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

  function autosize() {
    els.prompt.style.height = 'auto';
    els.prompt.style.height = `${Math.min(els.prompt.scrollHeight, 240)}px`;
  }

  // -- wiring

  els.composer.addEventListener('submit', (event) => {
    event.preventDefault();
    submit();
  });
  els.prompt.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      submit();
    }
  });
  els.prompt.addEventListener('input', autosize);
  els.stop.addEventListener('click', () => {
    if (state.controller) state.controller.abort();
  });
  els.newChat.addEventListener('click', newChat);
  els.historyToggle.addEventListener('click', () => toggleHistory());
  els.historyClose.addEventListener('click', () => toggleHistory(false));
  els.chatSearch.addEventListener('input', () => {
    clearTimeout(state.searchTimer);
    state.searchTimer = setTimeout(loadChats, 200);
  });
  els.chatList.addEventListener('click', (event) => {
    const item = event.target.closest('.chat-item');
    if (!item) return;
    const id = item.dataset.chatId;
    const confirmBox = item.querySelector('.chat-confirm');
    if (event.target.closest('.chat-open')) openChat(id);
    else if (event.target.closest('.chat-rename')) startRename(item);
    else if (event.target.closest('.chat-delete')) confirmBox.hidden = false;
    else if (event.target.closest('.chat-confirm-cancel')) confirmBox.hidden = true;
    else if (event.target.closest('.chat-confirm-delete')) deleteChat(id);
  });
  els.model.addEventListener('change', () => {
    renderModelInfo();
    saveSettings();
  });
  els.temperature.addEventListener('input', () => {
    showTemperature();
    saveSettings();
  });
  els.maxTokens.addEventListener('change', saveSettings);
  els.system.addEventListener('change', saveSettings);
  els.settingsToggle.addEventListener('click', () => toggleSettings());
  els.settingsClose.addEventListener('click', () => toggleSettings(false));
  els.scrim.addEventListener('click', () => {
    toggleSettings(false);
    if (!wide.matches) toggleHistory(false);
  });
  document.addEventListener('keydown', (event) => {
    if (event.key === 'Escape' && els.body.classList.contains('settings-open')) toggleSettings(false);
    if (event.key === 'Escape' && els.body.classList.contains('history-open')) toggleHistory(false);
  });
  wide.addEventListener('change', () => {
    els.body.classList.remove('settings-open', 'history-open');
    els.scrim.hidden = true;
  });
  for (const button of document.querySelectorAll('.suggestion')) {
    button.addEventListener('click', () => {
      els.prompt.value = button.textContent;
      submit();
    });
  }
  els.messages.addEventListener('click', async (event) => {
    const button = event.target.closest('.copy-code');
    if (!button) return;
    const code = button.closest('.code-block').querySelector('code').textContent;
    try {
      await navigator.clipboard.writeText(code);
      button.textContent = 'Copied';
    } catch {
      button.textContent = 'Copy failed';
    }
    setTimeout(() => (button.textContent = 'Copy'), 1500);
  });

  loadSettings();
  loadModels().then(() => {
    const linked = location.hash.match(/^#chat=([0-9a-f]+)$/);
    if (linked) openChat(linked[1]);
  });
  loadChats();
  // Focus the prompt where there is a keyboard; on touch screens that would pop one up.
  if (window.matchMedia('(pointer: fine)').matches) els.prompt.focus();

  // For tests and the curious: the renderer, and the conversation as it will be sent.
  window.tokenwire = {
    renderMarkdown: Markdown.render,
    conversation: () => state.conversation.slice(),
    chatId: () => state.chatId,
  };
})();
