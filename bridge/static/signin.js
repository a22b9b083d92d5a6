// The sign-in box: shown when the bridge answers 401 (the server has API keys), it keeps the key
// the user enters in session storage (this tab only, never in localStorage) and reloads the page,
// whose requests then carry it as `Authorization: Bearer <key>` (api.js).

import { apiKey, setApiKey } from './api.js';

const form = document.getElementById('signin');
const input = document.getElementById('signin-key');
const error = document.getElementById('signin-error');

/** Shows the box; with a key already kept, says that key was refused. */
function show() {
  if (!form.hidden) return;
  form.hidden = false;
  document.body.dataset.signin = 'needed';
  if (apiKey()) {
    error.textContent = 'The server refused this key (revoked, or mistyped). Enter another one.';
    error.hidden = false;
    setApiKey('');
  }
  input.focus();
}

/** Wires the box to the page: call once at start. */
export function installSignin() {
  window.addEventListener('tokenwire:unauthorized', show);
  form.addEventListener('submit', (event) => {
    event.preventDefault();
    const key = input.value.trim();
    if (!key) return;
    setApiKey(key);
    location.reload();
  });
}
