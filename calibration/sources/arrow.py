"""Columnar sources read one record batch at a time with pyarrow: Parquet files, and folders
written by `datasets.Dataset.save_to_disk` (Arrow IPC streams listed in its state.json).

Reading the saved folder with pyarrow rather than the `datasets` library keeps a heavy
dependency (pandas, and with it NumPy 2, which onnx-neural-compressor refuses) out.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any, Iterable, Iterator

from calibration.sources import Fields, Sample, SampleSource, describe_fields, missing_field_error
from calibration.sources.records import record_sample
from pipeline.core.errors import InputError, MissingDependencyError

ROWS_PER_BATCH = 1024


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise MissingDependencyError("reading Parquet or saved datasets needs pyarrow: pip install pyarrow") from None
    return pyarrow


def _batch_samples(batches: Iterable[Any], fields: Fields, path: Path) -> Iterator[Sample]:
    names = fields.names()
    for batch in batches:
        # Full validation first: pyarrow trusts a stream's offsets and lengths, and a damaged file
        # crashed the process (SIGSEGV in to_pylist) before this check; now it is an ArrowInvalid.
        batch.validate(full=True)
        try:
            columns = {name: batch.column(name).to_pylist() for name in names}
        except UnicodeDecodeError:
            raise InputError(f"{path}: a text column holds bytes that are not UTF-8; re-encode it as UTF-8") from None
        for row in range(batch.num_rows):
            record = {}
            for name, values in columns.items():
                value = values[row]
                if isinstance(value, bytes):
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        raise InputError(
                            f"{path}: column '{name}', row {row}: bytes that are not UTF-8; re-encode it as UTF-8"
                        ) from None
                record[name] = value
            sample = record_sample(record, fields)
            if sample is not None:
                yield sample


def _check_schema(schema: Any, fields: Fields, where: str) -> None:
    for name in fields.names():
        if name not in schema.names:
            raise missing_field_error(name, where, list(schema.names))


def _unreadable(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _parquet_samples(fields: Fields, path: Path) -> Iterator[Sample]:
    pa = _pyarrow()
    # A damaged file can fail while opening or in any later batch, with Arrow's own errors, an OSError
    # (thrift), or a UnicodeDecodeError (column names): every one of them is a bad data file.
    damaged = (pa.lib.ArrowException, OSError, UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError)
    try:
        parquet = pa.parquet.ParquetFile(str(path))
        _check_schema(parquet.schema_arrow, fields, f"the Parquet schema of {path}")
        yield from _batch_samples(parquet.iter_batches(batch_size=ROWS_PER_BATCH, columns=fields.names()), fields, path)
    except InputError:
        raise
    except damaged as exc:
        raise InputError(f"{path} is not a readable Parquet file ({_unreadable(exc)})") from None


def parquet_source(path: Path, fields: Fields) -> SampleSource:
    return SampleSource(f"parquet:{path.name}[{describe_fields(fields)}]", (path,), partial(_parquet_samples, fields))


def _arrow_stream_samples(fields: Fields, path: Path) -> Iterator[Sample]:
    pa = _pyarrow()
    try:
        with pa.memory_map(str(path)) as mapped:
            reader = pa.ipc.open_stream(mapped)
            _check_schema(reader.schema, fields, f"the saved dataset {path.parent}")
            yield from _batch_samples(reader, fields, path)
    except InputError:
        raise
    except (pa.lib.ArrowException, OSError, UnicodeDecodeError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not an Arrow stream written by save_to_disk ({_unreadable(exc)})") from None


def dataset_source(folder: Path, fields: Fields) -> SampleSource:
    """A `Dataset.save_to_disk` folder; a `DatasetDict` folder must be narrowed to one split."""
    if (folder / "dataset_dict.json").is_file():
        splits = json.loads((folder / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
        raise InputError(
            f"{folder} holds a DatasetDict with splits {', '.join(splits)}; give one split's folder, "
            f"e.g. --calib-source {folder / (splits[0] if splits else 'train')}"
        )
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        files = tuple(folder / entry["filename"] for entry in state["_data_files"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{folder} is not a folder written by save_to_disk (state.json: {exc})") from None
    root = folder.resolve()
    escaping = [str(path) for path in files if not path.resolve().is_relative_to(root)]
    if escaping:  # state.json is data: it must not make the build read (and record) files elsewhere
        raise InputError(f"saved dataset {folder} lists files outside its folder: {', '.join(escaping)}")
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise InputError(f"saved dataset {folder} lists files that are missing: {', '.join(missing)}")
    if not files:
        raise InputError(f"saved dataset {folder} holds no data files")
    return SampleSource(f"dataset:{folder.name}[{describe_fields(fields)}]", files, partial(_arrow_stream_samples, fields))
