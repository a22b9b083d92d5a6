// The web chat's Markdown renderer (a safe subset), as pure functions: no DOM, no state.
//
// Paragraphs, headings, **bold**, *italic*, ~~strike~~, `code`, fenced code blocks, lists (nested),
// block quotes, rules, simple tables, [links](https://…) and bare http(s) URLs. Every piece of
// source text goes through escapeHtml before any tag is added, and links accept http(s) only, so
// the output never contains markup that the model wrote.

const ESCAPES = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };

const FENCE_RE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^`]*$/;
const HEADING_RE = /^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$/;
const RULE_RE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE_RE = /^ {0,3}>\s?(.*)$/;
const LIST_RE = /^(\s*)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP_RE = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const PLACEHOLDER = '\u0000';

/**
 * Escapes text for use in HTML content and in quoted attribute values.
 *
 * @param {unknown} s Any value; it is converted with String().
 * @returns {string} The text with & < > " ' replaced by character references.
 */
export function escapeHtml(s) {
  return String(s).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

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
      // A class, not a style attribute: the page's Content-Security-Policy allows no inline styles.
      const cell = (tag, text, k) => `<${tag}${aligns[k] ? ` class="align-${aligns[k]}"` : ''}>${inline(text)}</${tag}>`;
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

/**
 * Renders Markdown source (a model's reply, possibly still streaming) as safe HTML.
 *
 * @param {string} source Markdown text; an unclosed code fence runs to the end.
 * @returns {string} HTML built from escaped text and this renderer's own tags only.
 */
export function renderMarkdown(source) {
  const text = String(source).replace(/\u0000/g, '\uFFFD').replace(/\r\n?/g, '\n');
  return renderBlocks(text.split('\n'));
}
