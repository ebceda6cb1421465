"""JSON nested deeper than the parser's stack (``[`` x 100,000) in every file we read: one
line naming the file, never a RecursionError traceback. The same kind as the server's deep JSON
body (tests/test_server_faults.py); every reader goes through `runtime.records.loads_json`."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlx_music.converters.adapters import read_peft_adapter
from mlx_music.converters.errors import ConvertError
from mlx_music.converters.mlx_config import read_json
from mlx_music.converters.shard_reader import _SafetensorsFile
from mlx_music.runtime.adapters import AdapterError, load_adapter
from mlx_music.runtime.batch_job import read_prompts
from mlx_music.runtime.checkpoint import CheckpointError, verify_checkpoint
from mlx_music.runtime.records import loads_json
from mlx_music.train.data import DataError, read_folder

DEEP = "[" * 100_000


def test_loads_json_turns_deep_nesting_into_a_value_error():
    with pytest.raises(ValueError, match="nested too deeply"):
        loads_json(DEEP)
    assert loads_json('{"a": [1, 2]}') == {"a": [1, 2]}


def _one_line(err: BaseException, path: Path) -> None:
    text = str(err)
    assert "\n" not in text and path.name in text, text
    assert not isinstance(err, RecursionError)


def test_checkpoint_config_and_record(tmp_path):
    (tmp_path / "config.json").write_text(DEEP)
    with pytest.raises(CheckpointError) as e:
        verify_checkpoint(tmp_path)
    _one_line(e.value, tmp_path / "config.json")


def test_safetensors_header(tmp_path):
    path = tmp_path / "model.safetensors"
    header = DEEP.encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    with pytest.raises(ConvertError) as e:
        _SafetensorsFile(path)
    _one_line(e.value, path)


def test_batch_prompts_row_is_an_error_row_not_a_crash(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "calm piano", "duration": 1}\n' + DEEP + "\n")
    rows = read_prompts(path)
    assert [r.error for r in rows][0] is None
    assert "nested too deeply" in rows[1].error


def test_hf_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(DEEP)
    with pytest.raises(ConvertError) as e:
        read_json(path, "config")
    _one_line(e.value, path)


def test_adapter_configs(tmp_path):
    mlx = tmp_path / "mlx-adapter"
    mlx.mkdir()
    (mlx / "adapter_config.json").write_text(DEEP)
    with pytest.raises(AdapterError) as e:
        load_adapter(mlx)
    _one_line(e.value, mlx)
    peft = tmp_path / "peft-adapter"
    peft.mkdir()
    (peft / "adapter_config.json").write_text(DEEP)
    with pytest.raises(ConvertError) as e:
        read_peft_adapter(peft)
    _one_line(e.value, peft / "adapter_config.json")


def test_training_metadata(tmp_path):
    (tmp_path / "metadata.jsonl").write_text(DEEP + "\n")
    with pytest.raises(DataError) as e:
        read_folder(tmp_path)
    _one_line(e.value, tmp_path / "metadata.jsonl")
