"""A critic bundle on disk: the folder's files and its manifest, checked before anything runs.

A bundle is ``model.onnx``, ``tokenizer.json`` and ``critic.json``; a bundle of format 2
(``bundle_format`` in the manifest) also holds ``head.json``, the feature head that combines the
encoder's logit with the turn features (service.critic.head). Format-1 bundles (no
``bundle_format``) score with the encoder alone. ``read_bundle`` checks the files and the manifest;
``check_model_io`` checks an onnxruntime session's inputs and outputs against the contract. Both
raise ``BundleError`` with a message that names the bundle and says what to fix, because the usual
reader is an operator who just pointed turngate at a folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.critic import head as feature_head
from service.critic import render

MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE = "model.onnx", "tokenizer.json", "critic.json"
INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT_NAME = "logits"
REQUIRED_FIELDS = ("name", "version", "format", "max_length", "precision")
MAX_POSITIONS = 512  # BERT-family position embeddings; longer inputs would index past them
BUNDLE_FORMATS = (1, 2)  # 1: encoder only; 2: encoder + feature head (head.json)


class BundleError(ValueError):
    """The folder is not a critic bundle this turngate can serve."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: str
    format: int
    max_length: int
    precision: str
    manifest: dict[str, Any] = field(repr=False)
    head: feature_head.Head | None = field(default=None, repr=False)

    @property
    def bundle_format(self) -> int:
        return 1 if self.head is None else 2

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_FILE

    def describe(self) -> dict[str, Any]:
        """What the admin API shows: the manifest's identity fields, not its whole training log."""
        m = self.manifest
        return {"path": str(self.path), "name": self.name, "version": self.version, "format": self.format,
                "bundle_format": self.bundle_format, "max_length": self.max_length, "precision": self.precision,
                "base_model": m.get("base_model"), "threshold_hints": m.get("threshold_hints"),
                "evaluation": m.get("evaluation")}


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_bundle(path: str | Path) -> Bundle:
    """The bundle in ``path``, its files present and its manifest complete and servable."""
    try:
        path = Path(path).expanduser().resolve()
    except (RuntimeError, ValueError, OSError) as e:  # "~nobody", a NUL byte, a loop: not a path to a bundle
        raise BundleError(f"critic bundle {str(path)!r}: not a usable path ({e})") from e
    if not path.is_dir():
        raise BundleError(f"critic bundle {path}: not a folder")
    missing = [f for f in (MODEL_FILE, TOKENIZER_FILE, MANIFEST_FILE) if not (path / f).is_file()]
    if missing:
        raise BundleError(f"critic bundle {path}: missing {', '.join(missing)} "
                          f"(a bundle holds {MODEL_FILE}, {TOKENIZER_FILE} and {MANIFEST_FILE})")
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"critic bundle {path}: {MANIFEST_FILE} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict):
        raise BundleError(f"critic bundle {path}: {MANIFEST_FILE} must hold a JSON object")
    absent = [k for k in REQUIRED_FIELDS if manifest.get(k) in (None, "")]
    if absent:
        raise BundleError(f"critic bundle {path}: {MANIFEST_FILE} lacks {', '.join(absent)}")
    fmt, max_length = manifest["format"], manifest["max_length"]
    if not isinstance(fmt, int) or isinstance(fmt, bool):
        raise BundleError(f"critic bundle {path}: format must be an integer, got {fmt!r}")
    if fmt != render.FORMAT_VERSION:
        raise BundleError(f"critic bundle {path} was trained on input format {fmt}, but this turngate "
                          f"renders format {render.FORMAT_VERSION}: re-export the bundle from a run "
                          f"trained with this version, or serve it with the turngate that made it")
    if not isinstance(max_length, int) or isinstance(max_length, bool) or not 8 <= max_length <= MAX_POSITIONS:
        raise BundleError(f"critic bundle {path}: max_length must be an integer in 8..{MAX_POSITIONS}, "
                          f"got {max_length!r}")
    return Bundle(path=path, name=str(manifest["name"]), version=str(manifest["version"]), format=fmt,
                  max_length=max_length, precision=str(manifest["precision"]), manifest=manifest,
                  head=_read_head(path, manifest))


def _read_head(path: Path, manifest: dict[str, Any]) -> feature_head.Head | None:
    layout = manifest.get("bundle_format", 1)
    if layout not in BUNDLE_FORMATS or isinstance(layout, bool):
        raise BundleError(f"critic bundle {path}: bundle_format {layout!r}, this turngate serves "
                          f"{' and '.join(map(str, BUNDLE_FORMATS))}")
    if layout == 1:
        return None
    try:
        head = feature_head.load(path)
    except feature_head.HeadError as e:
        raise BundleError(f"critic bundle {path}: {e}") from e
    if head is None:
        raise BundleError(f"critic bundle {path}: bundle_format 2 needs {feature_head.HEAD_FILE}")
    return head


def check_model_io(bundle: Bundle, inputs: list[Any], outputs: list[Any]) -> None:
    """``inputs``/``outputs``: onnxruntime NodeArg lists (``session.get_inputs()`` ...)."""
    where = f"critic bundle {bundle.path}: {MODEL_FILE}"
    got = {i.name: i for i in inputs}
    if set(got) != set(INPUT_NAMES):
        raise BundleError(f"{where} takes inputs {sorted(got)}, the contract is {list(INPUT_NAMES)}")
    for name in INPUT_NAMES:
        arg = got[name]
        if arg.type != "tensor(int64)" or len(arg.shape) != 2:
            raise BundleError(f"{where}: input {name} is {arg.type} of rank {len(arg.shape)}, "
                              f"the contract is tensor(int64) [batch, seq]")
    out = next((o for o in outputs if o.name == OUTPUT_NAME), None)
    if out is None:
        raise BundleError(f"{where} has outputs {[o.name for o in outputs]}, none named {OUTPUT_NAME!r}")
    if out.type not in ("tensor(float)", "tensor(float16)"):
        raise BundleError(f"{where}: output {OUTPUT_NAME} is {out.type}, the contract is a float tensor")
    if len(out.shape) not in (1, 2) or (len(out.shape) == 2 and out.shape[1] not in (1, None)
                                        and not isinstance(out.shape[1], str)):
        raise BundleError(f"{where}: output {OUTPUT_NAME} has shape {out.shape}, the contract is "
                          f"[batch] or [batch, 1]")
