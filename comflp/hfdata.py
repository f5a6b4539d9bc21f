"""HuggingFace datasets as corpora: a ``save_to_disk`` dir, an ``audiofolder`` dir, or a hub id.

Each row becomes an :class:`~comflp.data.Utterance` whose audio is a
:class:`DatasetAudio`: the stored bytes (or file path) of the row's audio
column, read with soundfile and resampled like a Kaldi dir's files, so the
same utterances give the same CER either way. The datasets library's own
audio decoding is never used: recent versions decode (and even encode, when
building an ``audiofolder``) through torchcodec and FFmpeg, which CPU installs
lack. So an ``audiofolder`` dir (``<dir>[/<split>]/metadata.csv|jsonl`` with a
``file_name`` column) is read here from its metadata table.

Reading never writes anything (the data layer has no side effects).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

from .data import Utterance
from .errors import ComflpError
from .paths import missing_local_path

TEXT_COLUMNS = ("text", "sentence", "transcription", "normalized_text")
ID_COLUMNS = ("id", "utt_id", "audio_id", "segment_id")
METADATA_FILES = ("metadata.csv", "metadata.jsonl")


@dataclass(frozen=True)
class DatasetAudio:
    """The audio of one dataset row, read on demand: ``audio`` is ``{"bytes": ..., "path": ...}`` or a path."""

    table: object  # a datasets.Dataset with the audio column not decoded, or None for a file
    row: int
    column: str
    name: str  # for messages: source[split][row]
    file: Path | None = None

    def open_audio(self) -> str | io.BytesIO:
        """What soundfile reads: the stored bytes, or the file they point to."""
        if self.file is not None:
            return str(self.file)
        value = self.table[self.row][self.column]
        if isinstance(value, dict) and value.get("bytes"):
            return io.BytesIO(value["bytes"])
        path = value.get("path") if isinstance(value, dict) else value
        if not path:
            raise ComflpError(f"{self.name}: column {self.column!r} holds neither audio bytes nor a path")
        return str(path)

    def __str__(self) -> str:
        return self.name


def _pick_text_column(columns: list[str], text_column: str | None, where: str) -> str | None:
    if text_column is not None:
        if text_column not in columns:
            raise ComflpError(f"{where}: no column {text_column!r} (--text_column); columns: {', '.join(columns)}")
        return text_column
    return next((c for c in TEXT_COLUMNS if c in columns), None)


def _utterances(table, source: str, split: str, *, audio_column: str, text_column: str | None,
                require_text: bool, files_root: Path | None = None) -> list[Utterance]:
    where = f"dataset {source} [{split}]"
    columns = list(table.column_names)
    if audio_column not in columns:
        raise ComflpError(f"{where}: no audio column {audio_column!r} (--audio_column); columns: {', '.join(columns)}")
    if len(table) == 0:
        raise ComflpError(f"{where} has no rows (--dataset_split)")
    text_col = _pick_text_column(columns, text_column, where)
    if require_text and text_col is None:
        raise ComflpError(f"{where}: no transcript column (one of {', '.join(TEXT_COLUMNS)}; or --text_column); "
                          f"columns: {', '.join(columns)}")
    if text_col is not None and not _is_text(table.features.get(text_col)):
        raise ComflpError(f"{where}: column {text_col!r} holds {_describe(table.features.get(text_col))}, not "
                          f"transcripts (--text_column); columns: {', '.join(columns)}")
    id_col = next((c for c in ID_COLUMNS if c in columns), None)
    texts = table[text_col] if text_col else [None] * len(table)
    ids = [str(x) for x in table[id_col]] if id_col else [f"{split}-{i:06d}" for i in range(len(table))]
    if len(set(ids)) != len(ids):
        ids = [f"{split}-{i:06d}" for i in range(len(table))]  # an id column that is not unique does not name rows
    utts = []
    for i, (utt, text) in enumerate(zip(ids, texts)):
        if require_text and (text is None or not str(text).strip()):
            raise ComflpError(f"{where} row {i} ({utt}): empty transcript in column {text_col!r}")
        name = f"{source}[{split}][{i}]"
        if files_root is not None:
            audio = DatasetAudio(None, i, audio_column, name, file=files_root / str(table[i][audio_column]))
        else:
            audio = DatasetAudio(table, i, audio_column, name)
        utts.append(Utterance(utt, audio, None if text is None else str(text)))
    return utts


def _saved_splits(dict_json: Path, name: str) -> list[str]:
    """The splits a saved DatasetDict lists."""
    import json

    try:
        splits = json.loads(dict_json.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ComflpError(f"cannot read dataset {name}: {dict_json.name} is damaged ({err})") from None
    return [str(s) for s in splits]


def _saved_without_rows(state_json: Path) -> bool:
    """True when a saved table's state lists no data file (a table saved with no rows)."""
    import json

    try:
        return json.loads(state_json.read_text(encoding="utf-8")).get("_data_files") == []
    except (OSError, ValueError, AttributeError):
        return False  # a damaged state is named by the library's load


def _is_text(feature) -> bool:
    """A column of strings (a table read from metadata.csv may infer numbers: those are no transcripts)."""
    import datasets

    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def _describe(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return f"{feature.dtype} values"
    return f"{type(feature).__name__} values"


def _audiofolder(root: Path, split: str) -> tuple[object, Path] | None:
    """The metadata table of an audiofolder split and the dir its ``file_name`` values are relative to."""
    from datasets import load_dataset

    for base in (root / split, root):
        for name in METADATA_FILES:
            meta = base / name
            if meta.is_file():
                kind = "csv" if name.endswith(".csv") else "json"
                table = load_dataset(kind, data_files=str(meta), split="train")
                if base == root and "split" in table.column_names:
                    table = table.filter(lambda r: r["split"] == split)
                return table, base
    return None


def read_dataset(source: str | os.PathLike, *, split: str, audio_column: str = "audio", text_column: str | None = None,
                 require_text: bool = True) -> list[Utterance]:
    """The utterances of one split of a dataset (see the module docstring for the sources)."""
    import datasets
    from datasets.config import DATASET_INFO_FILENAME, DATASET_STATE_JSON_FILENAME, DATASETDICT_JSON_FILENAME

    path = Path(source)
    name = str(source)
    saved_by_datasets = (DATASETDICT_JSON_FILENAME, DATASET_STATE_JSON_FILENAME, DATASET_INFO_FILENAME)
    if path.is_dir() and any((path / f).is_file() for f in saved_by_datasets):
        table_dir = path
        if (path / DATASETDICT_JSON_FILENAME).is_file():
            # the split's own dir is read alone: the library cannot load a dict that holds an empty split
            splits = _saved_splits(path / DATASETDICT_JSON_FILENAME, name)
            if split not in splits:
                raise ComflpError(f"dataset {name} has no split {split!r} (--dataset_split); splits: "
                                  f"{', '.join(splits)}")
            table_dir = path / split
        if _saved_without_rows(table_dir / DATASET_STATE_JSON_FILENAME):
            # checked here: the library's own load of a saved table without rows fails with an IndexError
            raise ComflpError(f"dataset {name} [{split}] has no rows (--dataset_split)")
        try:
            loaded = datasets.load_from_disk(str(table_dir))
        except Exception as err:  # the library raises several types for a damaged dir
            raise ComflpError(f"cannot read dataset {name}: {str(err).splitlines()[0]}") from None
        return _utterances(_undecoded(loaded, audio_column), name, split, audio_column=audio_column,
                           text_column=text_column, require_text=require_text)
    if path.is_dir():
        found = _audiofolder(path, split)
        if found is None:
            splits = sorted(d.name for d in path.iterdir() if d.is_dir() and any((d / m).is_file() for m in METADATA_FILES))
            raise ComflpError(f"{name}: neither a saved dataset nor an audiofolder with split {split!r}"
                              + (f" (splits: {', '.join(splits)})" if splits else f" (no {' or '.join(METADATA_FILES)})"))
        table, base = found
        column = "file_name" if audio_column == "audio" else audio_column
        return _utterances(table, name, split, audio_column=column, text_column=text_column,
                           require_text=require_text, files_root=base)
    if missing_local_path(name):
        raise ComflpError(f"dataset dir not found: {name} (no such local dir, and not a hub id: those read name "
                          "or org/name)")
    try:
        loaded = datasets.load_dataset(name, split=split)
    except ValueError as err:
        raise ComflpError(f"dataset {name}: {str(err).splitlines()[0]}") from None
    except Exception as err:  # offline, unknown id, gated: one line naming the dataset
        raise ComflpError(f"cannot load dataset {name} from the hub: {str(err).splitlines()[0]}") from None
    return _utterances(_undecoded(loaded, audio_column), name, split, audio_column=audio_column,
                       text_column=text_column, require_text=require_text)


def _undecoded(table, audio_column: str):
    """The table with its audio column left as stored bytes/paths (``Audio(decode=False)``)."""
    import datasets

    feature = table.features.get(audio_column)
    if isinstance(feature, datasets.Audio) and feature.decode:
        return table.cast_column(audio_column, datasets.Audio(decode=False))
    return table


@dataclass(frozen=True)
class DatasetSource:
    """A HuggingFace dataset named as a corpus: ``dataset`` (a ``save_to_disk`` dir, an audiofolder or a hub
    id; None: read the Kaldi dir instead), its ``split`` and its audio and text columns (None: guessed)."""

    dataset: str | None = None
    split: str = "train"
    audio_column: str | None = None
    text_column: str | None = None

    @classmethod
    def of(cls, settings, *, split: str | None = None) -> "DatasetSource":
        """The source that parsed flags or a :class:`comflp.finetune.FinetuneConfig` name (``--dataset``,
        ``--dataset_split``, ``--audio_column``, ``--text_column``); ``split`` overrides the split."""
        return cls(getattr(settings, "dataset", None), split or getattr(settings, "dataset_split", "train"),
                   getattr(settings, "audio_column", None), getattr(settings, "text_column", None))


def read_corpus_or_dataset(source: DatasetSource, data_dir, *, require_text: bool = True) -> list[Utterance]:
    """The utterances of ``source.dataset`` when it is set, else of the Kaldi dir ``data_dir``; read only."""
    if source.dataset:
        return read_dataset(source.dataset, split=source.split, audio_column=source.audio_column,
                            text_column=source.text_column, require_text=require_text)
    from .data import read_corpus_dir

    return read_corpus_dir(data_dir, require_text=require_text)
