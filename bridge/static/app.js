// tokenwire web chat: plain JavaScript modules, no build step, no third-party code.
//
// The entry module (index.html loads it with <script type="module">): it wires the page's
// controls to the modules below and starts the page.
//
//   markdown.js      the Markdown renderer (pure; escapes all HTML before it adds any tag)
//   sse.js           server-sent events read from a fetch() response body
//   api.js           the bridge's HTTP API: /api/models, /api/chats…
//   format.js        sizes, counts, dates and state names as text
//   dom.js           the page's elements
//   settings.js      the settings drawer, kept in localStorage
//   models.js        the model picker and the model card
//   chat-list.js     the Chats sidebar: list, search, rename, delete
//   messages.js      the transcript's message bubbles
//   stats.js         the status line's figures
//   conversation.js  the open chat: send, stream the reply, stop, new chat, open a stored chat
//   microphone.js    the microphone button: record, transcribe, into the message box

import { loadChats, removeChat, searchSoon, startRename, toggleHistory } from './chat-list.js';
import { installAttachments } from './attachments.js';
import { installMicrophone } from './microphone.js';
import { autosize, conversation, newChat, openChat, openChatId, stop, submit } from './conversation.js';
import { els, wide } from './dom.js';
import { renderMarkdown } from './markdown.js';
import { loadModels, renderModelInfo } from './models.js';
import { installSignin } from './signin.js';
import { loadSettings, saveSettings, showTemperature, toggleSettings } from './settings.js';

async function deleteChat(id) {
  if (!(await removeChat(id))) return;
  if (openChatId() === id) newChat();
  loadChats();
}

async function copyCode(button) {
  const code = button.closest('.code-block').querySelector('code').textContent;
  try {
    await navigator.clipboard.writeText(code);
    button.textContent = 'Copied';
  } catch {
    button.textContent = 'Copy failed';
  }
  setTimeout(() => (button.textContent = 'Copy'), 1500);
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
els.stop.addEventListener('click', () => stop());
els.newChat.addEventListener('click', () => newChat());
els.historyToggle.addEventListener('click', () => toggleHistory());
els.historyClose.addEventListener('click', () => toggleHistory(false));
els.chatSearch.addEventListener('input', searchSoon);
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
els.messages.addEventListener('click', (event) => {
  const button = event.target.closest('.copy-code');
  if (button) copyCode(button);
});

// -- start

installSignin();
installAttachments();
installMicrophone();
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
  renderMarkdown,
  conversation,
  chatId: openChatId,
};
