// Images attached to the next message: the 📎 button (a file picker), pasting into the message
// box, and dropping onto the composer; each shown as a preview with a remove button until sent.
// The server reads their text (OCR) for the model; it understands nothing else of an image.

import { els, element } from './dom.js';

const MAX_BYTES = 3 * 1024 * 1024; // the server's limit per image
const MAX_IMAGES = 8;
const TYPES = ['image/png', 'image/jpeg', 'image/webp', 'image/gif', 'image/bmp'];

/** @type {{url: string, name: string}[]} */
let pending = [];

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function say(text) {
  els.attachError.textContent = text;
  els.attachError.hidden = !text;
}

function render() {
  const items = pending.map((image, i) => {
    const item = element('div', 'attachment');
    item.dataset.testid = 'attachment';
    const img = element('img');
    img.src = image.url;
    img.alt = image.name || `image ${i + 1}`;
    const remove = element('button', 'attachment-remove', '×');
    remove.type = 'button';
    remove.title = 'Remove this image';
    remove.setAttribute('aria-label', `Remove ${img.alt}`);
    remove.addEventListener('click', () => {
      pending.splice(i, 1);
      render();
    });
    item.append(img, remove);
    return item;
  });
  els.attachments.replaceChildren(...items);
  els.attachments.hidden = !pending.length;
}

/** Adds image files (from the picker, a paste or a drop); others are refused with a note. */
export async function addFiles(files) {
  say('');
  for (const file of files) {
    if (!TYPES.includes(file.type)) {
      say(`${file.name || 'That file'} is not a PNG, JPEG, WebP, GIF or BMP image.`);
      continue;
    }
    if (file.size > MAX_BYTES) {
      say(`${file.name || 'That image'} is ${(file.size / 1048576).toFixed(1)} MiB; images are at most 3 MiB.`);
      continue;
    }
    if (pending.length >= MAX_IMAGES) {
      say(`At most ${MAX_IMAGES} images in a message.`);
      break;
    }
    pending.push({ url: await readAsDataUrl(file), name: file.name || '' });
  }
  render();
}

/** @returns {string[]} The data URLs of the attached images, which are cleared. */
export function takeImages() {
  const urls = pending.map((image) => image.url);
  pending = [];
  render();
  return urls;
}

/** Whether an image is attached (a message may then be sent without text). */
export function hasImages() {
  return pending.length > 0;
}

/**
 * Shows a message's images (data URLs) above its text, with the text the server read in each as
 * the image's description.
 *
 * @param {HTMLElement} node A .message element.
 * @param {{url: string, text?: string}[]} images
 */
export function showImages(node, images) {
  if (!images.length) return;
  const strip = element('div', 'message-images');
  for (const image of images) {
    const img = element('img', 'message-image');
    img.dataset.testid = 'message-image';
    img.src = image.url;
    img.alt = image.text ? `Image; its text: ${image.text}` : 'Image';
    if (image.text !== undefined) img.title = image.text ? `Text read in the image:\n${image.text}` : 'No text found in the image';
    strip.append(img);
  }
  node.querySelector('.bubble').insertBefore(strip, node.querySelector('.content'));
}

/** Wires the picker, paste and drop. */
export function installAttachments() {
  els.attachButton.addEventListener('click', () => els.attachInput.click());
  els.attachInput.addEventListener('change', () => {
    addFiles([...els.attachInput.files]);
    els.attachInput.value = '';
  });
  els.prompt.addEventListener('paste', (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith('image/'));
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  els.composer.addEventListener('dragover', (event) => {
    if ([...(event.dataTransfer?.types || [])].includes('Files')) {
      event.preventDefault();
      els.composer.classList.add('dropping');
    }
  });
  els.composer.addEventListener('dragleave', () => els.composer.classList.remove('dropping'));
  els.composer.addEventListener('drop', (event) => {
    els.composer.classList.remove('dropping');
    if (event.dataTransfer?.files?.length) {
      event.preventDefault();
      addFiles([...event.dataTransfer.files]);
    }
  });
}
