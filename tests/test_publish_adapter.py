"""`mlx-music publish` of a `mlx-music train` output folder (MLX adapter + PEFT copy + model card).

A tiny adapter is trained once (2 steps on the shipped tiny stereo model and the tone dataset of
tests/make_tone_dataset.py); uploads go to test_publish's Hub stand-in on 127.0.0.1, and the
published repo is loaded back with `load(base, adapter=<repo id>)` through a fresh HF cache.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import mlx_music  # noqa: F401  (before mlx.core: binds MKL)
import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from huggingface_hub import ModelCard

from make_tone_dataset import write_dataset
from mlx_music.cli import main
from mlx_music.converters.adapters import read_peft_adapter
from mlx_music.converters.publish import PublishError, publish
from mlx_music.runtime import load
from mlx_music.train.export import save_adapters
from mlx_music.train.run import TrainOptions, train
from tests.test_publish import TOKEN, fake_hub, no_token  # noqa: F401  (fixtures)
from tests.test_reliability_convert import tree_digest

REPO = "me/tones-lora"
BASE_ID = "me/tiny-musicgen-stereo"
FILES = ["README.md", "adapter_config.json", "adapters.safetensors", "conversion.json",
         "peft/adapter_config.json", "peft/adapter_model.safetensors"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("publish-adapter")
    data = write_dataset(root / "tones", seconds=2.0, repeats=1)
    return train(TrainOptions(data=str(data), model=str(model), out=str(root / "run"), steps=2, batch_size=2,
                              rank=4, alpha=8.0, lr=5e-3, segment=1.0, min_seconds=0.5, val_fraction=0.2,
                              val_every=1, save_every=2, progress=False))


@pytest.fixture
def run(trained, tmp_path):
    """A private copy of the trained output folder (tests may damage it)."""
    return shutil.copytree(trained, tmp_path / "run")


def _factors(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


def test_train_card_names_base_data_steps_loss(trained, model):
    card = (trained / "README.md").read_text()
    last = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()][-1]
    assert ModelCard(card).data.base_model == str(model)
    assert "| steps | 2 |" in card and "| data | 10 training pieces (10.0 s of audio), 2 held out" in card
    assert f"| train loss (last step) | {last['loss']} |" in card
    assert f"| validation loss (last) | {last['val_loss']} |" in card


def test_dry_run_plan_and_base_model(run, model, no_token):
    # The run's --model was a local folder whose record names no Hub model: say what to pass.
    with pytest.raises(PublishError, match=r"adapter_config.json: base model .* base_model='ORG/NAME'"):
        publish(run, REPO, dry_run=True, log=None)
    lines: list[str] = []
    before = tree_digest(run)
    names = publish(run, REPO, dry_run=True, log=lines.append, base_model=BASE_ID)
    assert names == FILES  # metrics, plot, checkpoint/ and cache/ stay home
    assert lines[0] == f"Would upload 6 files ({sum(int(ln.split()[0].replace(',', '')) for ln in lines[1:]):,} " \
                       f"bytes) to model repo {REPO}:"
    assert [ln.split()[1] for ln in lines[1:]] == FILES
    sizes = {ln.split()[1]: int(ln.split()[0].replace(",", "")) for ln in lines[1:]}
    for n in ("adapters.safetensors", "peft/adapter_model.safetensors"):
        assert sizes[n] == (run / n).stat().st_size
    assert tree_digest(run) == before  # publishing an adapter never changes the training folder
    with pytest.raises(PublishError, match="^base_model: invalid repo id 'not an id'"):
        publish(run, REPO, dry_run=True, log=None, base_model="not an id")


def test_base_model_from_config_or_base_record(run, tmp_path, no_token):
    """Without --base-model: a Hub id in adapter_config.json is used as is; a local base folder
    gives the Hub id its conversion.json records."""
    factors = {k[: -len(".lora_a")]: (mx.array(v), mx.array(_factors(run)[k[: -len(".lora_a")] + ".lora_b"]))
               for k, v in _factors(run).items() if k.endswith(".lora_a")}
    cfg = json.loads((run / "adapter_config.json").read_text())
    local_base = tmp_path / "base"
    local_base.mkdir()
    (local_base / "conversion.json").write_text(json.dumps({"base_model": "facebook/musicgen-small"}))
    for base, want in (("facebook/musicgen-melody", "facebook/musicgen-melody"),
                       (str(local_base), "facebook/musicgen-small")):
        out = tmp_path / f"out-{len(want)}"
        save_adapters(out, factors, rank=cfg["r"], alpha=cfg["lora_alpha"], rslora=False, scale=2.0,
                      base_model=base, info={**cfg["training"], "base_model": base})
        publish(out, REPO, dry_run=True, log=None)  # no error: the base is known
        from mlx_music.converters.publish import validate_adapter_folder

        _, mem = validate_adapter_folder(out, REPO)
        assert ModelCard(mem["README.md"].decode()).data.base_model == want
        if base != want:  # the local path is replaced everywhere it would have been published
            assert json.loads(mem["adapter_config.json"])["base_model"] == want
            assert json.loads(mem["adapter_config.json"])["training"]["base_model"] == want
            assert json.loads(mem["peft/adapter_config.json"])["base_model_name_or_path"] == want
            assert all(str(local_base).encode() not in b for b in mem.values())


def test_card_generated_when_absent(run, no_token):
    from mlx_music.converters.publish import validate_adapter_folder

    _, with_card = validate_adapter_folder(run, REPO, BASE_ID)
    (run / "README.md").unlink()
    _, without = validate_adapter_folder(run, REPO, BASE_ID)
    assert without["README.md"] == with_card["README.md"]  # the same card, from adapter_config's metadata
    assert b"| steps | 2 |" in without["README.md"]


def test_upload_one_commit_then_load_back(run, model, fake_hub, tmp_path, monkeypatch, no_token):
    from huggingface_hub import constants, snapshot_download

    before = tree_digest(run)
    names = publish(run, REPO, token=TOKEN, endpoint=fake_hub.url, log=None, base_model=BASE_ID)
    assert names == FILES and tree_digest(run) == before
    assert len(fake_hub.commits) == 1 and fake_hub.commits[0]["summary"] == "Upload LoRA adapter (6 files)"
    assert sorted(fake_hub.commits[0]["keys"]) == ["file"] * 4 + ["lfsFile"] * 2
    tree = fake_hub.repos[REPO]["branches"]["main"]
    assert sorted(tree) == FILES
    for n in ("adapters.safetensors", "peft/adapter_model.safetensors"):
        assert tree[n] == (run / n).read_bytes(), n
    card = tree["README.md"].decode()
    assert ModelCard(card).data.base_model == BASE_ID and "| steps | 2 |" in card
    assert f"--model {BASE_ID} --adapter {REPO} " in card and f'"{REPO}", subfolder="peft"' in card
    assert all(str(model).encode() not in b for b in tree.values())  # no local path goes public
    assert json.loads(tree["adapter_config.json"])["base_model"] == BASE_ID
    assert json.loads(tree["peft/adapter_config.json"])["base_model_name_or_path"] == BASE_ID
    record = json.loads(tree["conversion.json"])
    assert sorted(record["files"]) == [n for n in FILES if n != "conversion.json"]
    for n, meta in record["files"].items():
        assert meta == {"sha256": hashlib.sha256(tree[n]).hexdigest(), "size": len(tree[n])}, n

    # Back from the Hub through a fresh cache: the MLX adapter by repo id, the PEFT copy by snapshot.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub_pipe, local_pipe, plain = load(model, adapter=REPO), load(model, adapter=run), load(model)
    from mlx.utils import tree_flatten

    hub_w, local_w, base_w = (dict(tree_flatten(p.model.parameters())) for p in (hub_pipe, local_pipe, plain))
    changed = [k for k in base_w if not np.array_equal(np.array(local_w[k]), np.array(base_w[k]))]
    assert len(changed) >= 6  # the adapter moved the weights it targets
    for k in base_w:
        assert np.array_equal(np.array(hub_w[k]), np.array(local_w[k])), k
    a = hub_pipe.generate(["a pure tone at 440 Hz, note A4"], duration=0.2, seed=3, progress=False).audio[0]
    b = local_pipe.generate(["a pure tone at 440 Hz, note A4"], duration=0.2, seed=3, progress=False).audio[0]
    assert np.array_equal(np.array(a), np.array(b))
    # The command line takes the repo id too, and writes what the local folder gives.
    wavs = {}
    for name, adapter in (("hub", REPO), ("local", str(run))):
        wavs[name] = tmp_path / f"{name}.wav"
        res = CliRunner().invoke(main, ["generate", "--model", str(model), "--adapter", adapter, "--prompt",
                                        "a pure tone at 440 Hz, note A4", "--duration", "0.2", "--seed", "3",
                                        "--out", str(wavs[name]), "--quiet"])
        assert res.exit_code == 0, res.output
    hub_wav, local_wav = (sf.read(wavs[n])[0] for n in ("hub", "local"))
    assert hub_wav.shape[0] == 6400 and np.array_equal(hub_wav, local_wav)

    snap = snapshot_download(REPO, endpoint=fake_hub.url, cache_dir=str(tmp_path / "cache2"))
    peft_hub, peft_local = read_peft_adapter(f"{snap}/peft"), read_peft_adapter(run / "peft")
    assert peft_hub.config["base_model_name_or_path"] == BASE_ID
    assert sorted(peft_hub.modules) == sorted(peft_local.modules) and len(peft_hub.modules) >= 6
    for name, m in peft_hub.modules.items():
        assert np.array_equal(m.a, peft_local.modules[name].a) and np.array_equal(m.b, peft_local.modules[name].b)


# -- refused: one line, exit 2, naming the file; nothing uploaded, the folder unchanged ------------

def _flip(path, at):
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x40
    path.write_bytes(bytes(raw))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])


def _older_peft(run, tmp_path):
    """What a kill between the MLX and the PEFT writes of a save leaves: PEFT of another step."""
    f = _factors(run)
    factors = {k[: -len(".lora_a")]: (mx.array(v), mx.array(f[k[: -len(".lora_a")] + ".lora_b"] * 0.5))
               for k, v in f.items() if k.endswith(".lora_a")}
    cfg = json.loads((run / "adapter_config.json").read_text())
    other = tmp_path / "other"
    save_adapters(other, factors, rank=cfg["r"], alpha=cfg["lora_alpha"], rslora=False, scale=2.0,
                  base_model=cfg["base_model"])
    shutil.rmtree(run / "peft")
    shutil.copytree(other / "peft", run / "peft")


def _edit_card_step(run, tmp_path):
    card = run / "README.md"
    card.write_text(card.read_text().replace("| steps | 2 |", "| steps | 1 |"))


CASES = {
    "peft-weights-missing": (lambda r, t: (r / "peft" / "adapter_model.safetensors").unlink(),
                             ["peft/adapter_model.safetensors missing"]),
    "peft-config-missing": (lambda r, t: (r / "peft" / "adapter_config.json").unlink(),
                            ["peft/adapter_config.json missing"]),
    "peft-weights-truncated": (lambda r, t: _truncate(r / "peft" / "adapter_model.safetensors"),
                               ["peft/adapter_model.safetensors"]),
    "peft-weights-edited": (lambda r, t: _flip(r / "peft" / "adapter_model.safetensors", -3),
                            ["peft/adapter_model.safetensors", "differs from the MLX adapter"]),
    "peft-of-another-save": (_older_peft, ["peft/adapter_model.safetensors", "differs from the MLX adapter"]),
    "mlx-weights-truncated": (lambda r, t: _truncate(r / "adapters.safetensors"),
                              ["adapters.safetensors: size", "conversion.json"]),
    "mlx-weights-edited": (lambda r, t: _flip(r / "adapters.safetensors", -3),
                           ["adapters.safetensors: sha256 differs", "conversion.json"]),
    "mlx-config-edited": (lambda r, t: (r / "adapter_config.json").write_text(
        (r / "adapter_config.json").read_text().replace('"r": 4', '"r": 8')), ["adapter_config.json: sha256 differs"]),
    "record-missing": (lambda r, t: (r / "conversion.json").unlink(), ["conversion.json missing"]),
    "card-of-another-step": (_edit_card_step, ["README.md: card says 1 steps", "step 2"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refuses_damaged_adapter_folder(case, run, tmp_path, fake_hub, no_token):
    damage, needles = CASES[case]
    damage(run, tmp_path)
    before = tree_digest(run)
    res = CliRunner().invoke(main, ["publish", str(run), "--repo-id", REPO, "--token", TOKEN,
                                    "--base-model", BASE_ID])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {run}"), res.output
    for n in needles:
        assert n in lines[0], lines[0]
    assert fake_hub.repos == {} and fake_hub.commits == []  # nothing reached the Hub
    assert tree_digest(run) == before


def test_base_model_only_for_adapters(tmp_path, model, no_token):
    res = CliRunner().invoke(main, ["publish", str(model), "--repo", REPO, "--dry-run", "--base-model", BASE_ID])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "--base-model: only for an adapter folder" in res.output


def test_cli_names_the_base_model_flag(run, no_token):
    """The API names base_model; the command line says --base-model (both hints)."""
    res = CliRunner().invoke(main, ["publish", str(run), "--repo", REPO, "--dry-run"])
    assert res.exit_code == 2 and res.output.count("\n") == 1, res.output
    assert "pass --base-model ORG/NAME, the Hub model it was trained on" in res.output
    res = CliRunner().invoke(main, ["publish", str(run), "--repo", REPO, "--dry-run", "--base-model", "not an id"])
    assert res.exit_code == 2 and res.output.startswith("error: --base-model: invalid repo id 'not an id'"), res.output
