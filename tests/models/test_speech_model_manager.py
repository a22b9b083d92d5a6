"""A speech model in the model manager, like any other: loaded on first use, counted against
--max-loaded-models and the memory budget (an idle one is unloaded to make room), and unloaded when
its keep-alive runs out."""

from __future__ import annotations

import shutil

from conftest import EMBEDDING_MODEL, SPEECH_MODEL, linked_store, wait_until
from speech_audio import SENTENCES, synth, wer

from tokenwire.server.engine.transcriber import Transcriber, TranscriptFinished
from tokenwire.server.models.manager import ModelLimits, ModelManager
from tokenwire.server.models.store import ModelStore


def test_speech_models_load_on_use_and_unload_like_the_others(models_dir, tmp_path):
    root = linked_store(tmp_path / "store", models_dir)
    keep = {ModelStore(root).get(m).path.name for m in (SPEECH_MODEL, EMBEDDING_MODEL)}
    for folder in root.iterdir():  # just these two (their files are links)
        if folder.is_dir() and folder.name not in keep:
            shutil.rmtree(folder)
    manager = ModelManager(ModelStore(root), threads=2, limits=ModelLimits(max_loaded=1, keep_alive_s=300))
    try:
        assert manager.status(SPEECH_MODEL).state == "available"
        speech = manager.acquire("whisper-tiny-en")
        assert isinstance(speech.scheduler, Transcriber) and manager.loaded_ids() == [SPEECH_MODEL]
        assert speech.memory_bytes >= 70_000_000  # at least its weights
        events = speech.scheduler.transcribe(synth(SENTENCES[6]))
        assert isinstance(events[-1], TranscriptFinished) and wer(SENTENCES[6], events[-1].text) <= 0.15
        manager.release(speech)
        manager.get(EMBEDDING_MODEL)  # one model at most: the idle speech model makes room
        assert manager.loaded_ids() == [EMBEDDING_MODEL] and speech.scheduler is None
        speech = manager.acquire(SPEECH_MODEL)
        assert manager.load_count[SPEECH_MODEL] == 2
        manager.release(speech, keep_alive_s=0)  # keep-alive over: the reaper unloads it
        wait_until(lambda: manager.loaded_ids() == [], timeout=10)
    finally:
        manager.close()
