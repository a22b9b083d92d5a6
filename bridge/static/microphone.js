// The microphone button: records what is said (MediaRecorder), sends the recording to the
// bridge's /v1/audio/transcriptions (the server's speech model: English), and puts the transcript
// in the message box, to edit before sending. Browsers offer the microphone only to secure pages
// (https://, or http://localhost): elsewhere the button says so instead.

import { transcribe } from './api.js';
import { autosize } from './conversation.js';
import { els } from './dom.js';

const INSECURE = 'The microphone needs a secure page: open tokenwire at http://localhost or over HTTPS ' +
  '(browsers allow recording nowhere else).';

let recorder = null;
let stream = null;
let chunks = [];

function say(text, isError = false) {
  els.micStatus.textContent = text;
  els.micStatus.classList.toggle('error-text', isError);
  els.micStatus.hidden = !text;
}

function setState(state) {
  // idle, recording, transcribing: the button's look (style.css) and label follow it
  els.micButton.dataset.state = state;
  els.micButton.setAttribute('aria-pressed', String(state === 'recording'));
  els.micButton.disabled = state === 'transcribing';
  const label = state === 'recording' ? 'Stop recording and transcribe' : 'Speak your message (English)';
  els.micButton.title = label;
  els.micButton.setAttribute('aria-label', label);
}

/** Whether this page may record at all. */
export function microphoneAvailable() {
  return Boolean(navigator.mediaDevices && navigator.mediaDevices.getUserMedia && window.MediaRecorder);
}

async function start() {
  try {
    stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  } catch (err) {
    say(`No microphone: ${err.message || err.name}`, true);
    return;
  }
  chunks = [];
  recorder = new MediaRecorder(stream);
  recorder.addEventListener('dataavailable', (event) => {
    if (event.data && event.data.size) chunks.push(event.data);
  });
  recorder.addEventListener('stop', finish);
  recorder.start(250);
  setState('recording');
  say('Recording… click the microphone again to stop.');
}

async function finish() {
  for (const track of stream.getTracks()) track.stop();
  const type = recorder.mimeType || 'audio/webm';
  recorder = null;
  stream = null;
  const blob = new Blob(chunks, { type });
  chunks = [];
  setState('transcribing');
  say('Transcribing…');
  try {
    const ext = type.includes('ogg') ? 'ogg' : type.includes('mp4') ? 'm4a' : 'webm';
    const text = (await transcribe(blob, `recording.${ext}`)).trim();
    if (text) {
      const before = els.prompt.value;
      els.prompt.value = before && !/\s$/.test(before) ? `${before} ${text}` : before + text;
      autosize();
      els.prompt.focus();
      say('');
    } else {
      say('No speech was heard in the recording.', true);
    }
  } catch (err) {
    say(`Could not transcribe: ${err.message}`, true);
  } finally {
    setState('idle');
  }
}

/** Wires the microphone button (index.html's #mic). */
export function installMicrophone() {
  setState('idle');
  els.micButton.addEventListener('click', () => {
    if (!microphoneAvailable()) {
      say(INSECURE, true);
      return;
    }
    if (recorder) recorder.stop();
    else start();
  });
  if (!microphoneAvailable()) {
    els.micButton.dataset.available = 'false';
    els.micButton.title = INSECURE;
  }
}
