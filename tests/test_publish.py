"""converters/publish.py + converters/model_card.py.

The real-upload test runs huggingface_hub's own create_repo + upload_folder against a minimal Hub
stand-in served on 127.0.0.1 by this test (repo create, README YAML validation, preupload,
git-LFS batch + PUT + verify, NDJSON commit, branch create). Xet is disabled for that test: its CAS
protocol (chunked, deduplicated xorbs/shards via hf_xet) is not something a test server can fake.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mlx_music.converters.model_card import REPO_PLACEHOLDER, render_model_card
from mlx_music.converters.publish import PublishError, find_token, publish, validate_folder, validate_repo_id
from tests.test_hub import fake_checkpoint_files, write_folder

TOKEN = "hf_testtoken0123456789"

# -- model card ---------------------------------------------------------------------------------

CONFIG = {"format": "mlx-music", "format_version": 1, "model_type": "musicgen_melody",
          "variant": "musicgen-stereo-melody", "sample_rate": 32000, "frame_rate": 50,
          "audio_channels": 2, "num_codebooks": 8,
          "decoder": {"num_layers": 48, "hidden_size": 1536, "num_heads": 24},
          "text_encoder": {"num_layers": 12, "d_model": 768}, "melody": {"num_chroma": 12},
          "dtype": "float16",
          "quantization": {"bits": 4, "group_size": 64, "recipe": "decoder-linear",
                           "quantized": ["a", "b"], "skipped": ["c"]}}
RECORD = {"converter": "mlx-music 0.1.0", "created": "2026-01-01T00:00:00+00:00", "dtype": "float16",
          "base_model": "facebook/musicgen-stereo-melody", "license": "cc-by-nc-4.0",
          "source": {"path": "/home/me/secret/path", "repo_id": "facebook/musicgen-stereo-melody",
                     "revision": "0123456789abcdef0123456789abcdef01234567", "layout": "sharded",
                     "files": ["config.json", "model-00001-of-00002.safetensors"]},
          "quantization": CONFIG["quantization"],
          "files": {"config.json": {"sha256": "ab" * 32, "size": 1234}}}


def _front_matter(card: str) -> dict:
    from huggingface_hub import ModelCard

    return ModelCard(card).data.to_dict()


def test_model_card_full():
    card = render_model_card(CONFIG, RECORD, repo_id="me/musicgen-stereo-melody-4bit-mlx")
    meta = _front_matter(card)
    assert meta["library_name"] == "mlx" and meta["pipeline_tag"] == "text-to-audio"
    assert meta["base_model"] == "facebook/musicgen-stereo-melody" and meta["license"] == "cc-by-nc-4.0"
    assert meta["base_model_relation"] == "quantized"
    assert set(meta["tags"]) >= {"mlx", "musicgen", "text-to-audio", "stereo", "melody", "4-bit"}
    assert "pip install mlx-music-toolkit\n" in card
    assert 'mlx-music generate --model me/musicgen-stereo-melody-4bit-mlx --prompt "' in card
    assert 'model = load("me/musicgen-stereo-melody-4bit-mlx")' in card
    assert "from mlx_music import load" in card and "result = model.generate([" in card and "duration=10)" in card
    assert "0123456789abcdef0123456789abcdef01234567" in card and "mlx-music 0.1.0" in card
    assert "model-00001-of-00002.safetensors" in card and "float16" in card and "group size 64" in card
    assert "/home/me/secret" not in card  # local paths never leak into a public card


def test_model_card_minimal_mono():
    cfg = {"format": "mlx-music", "model_type": "musicgen", "audio_channels": 1, "dtype": "float32",
           "quantization": None}
    card = render_model_card(cfg, {"base_model": "facebook/musicgen-small", "dtype": "float32"})
    meta = _front_matter(card)
    assert meta["tags"] == ["mlx", "musicgen", "text-to-audio"]
    assert "license" not in meta and "base_model_relation" not in meta
    assert REPO_PLACEHOLDER in card  # target repo unknown at conversion time


# -- validation / dry run ------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path) -> Path:
    files = fake_checkpoint_files("pub", shards=2)
    card = render_model_card({"format": "mlx-music", "model_type": "musicgen", "audio_channels": 1},
                             {"base_model": "facebook/musicgen-small"}).encode()
    files["README.md"] = card
    record = json.loads(files["conversion.json"])
    record["files"]["README.md"] = {"sha256": hashlib.sha256(card).hexdigest(), "size": len(card)}
    files["conversion.json"] = json.dumps(record, indent=2).encode()
    folder = write_folder(tmp_path / "ckpt", files)
    (folder / "notes.txt").write_text("stray file, not part of the checkpoint")
    return folder


@pytest.fixture
def no_token(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))


EXPECTED = ["README.md", "config.json", "conversion.json", "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors", "model.safetensors.index.json", "tokenizer.json"]


def test_dry_run_lists_exact_files(ckpt, no_token):
    lines: list[str] = []
    names = publish(ckpt, "me/tiny-mlx", dry_run=True, log=lines.append)
    assert names == EXPECTED  # stray notes.txt excluded, no token needed
    readme_before = (ckpt / "README.md").read_bytes()
    sizes = {n: (ckpt / n).stat().st_size for n in EXPECTED}
    # README gets the real repo id; its size (and the record's) are reported as they will be uploaded.
    sizes["README.md"] = len(readme_before.replace(REPO_PLACEHOLDER.encode(), b"me/tiny-mlx"))
    body = lines[1:]
    assert len(body) == len(EXPECTED)
    for line, name in zip(body, EXPECTED):
        size, got = line.split()
        assert got == name
        if name != "conversion.json":
            assert int(size.replace(",", "")) == sizes[name]
    assert "Would upload 7 files" in lines[0] and "me/tiny-mlx" in lines[0]
    assert (ckpt / "README.md").read_bytes() == readme_before  # dry run writes nothing


def test_validate_folder_plan(ckpt):
    plan = validate_folder(ckpt)
    assert [n for n, _ in plan] == EXPECTED
    assert all(size == (ckpt / n).stat().st_size for n, size in plan)


@pytest.mark.parametrize("bad", ["tiny", "a/b/c", "me/-x", "me/x--y", "me/x..y", "me /x", "me/x.git",
                                 "me/" + "x" * 97, ""])
def test_bad_repo_ids(bad):
    with pytest.raises(PublishError, match="invalid repo id"):
        validate_repo_id(bad)


def test_no_token_is_clear(ckpt, no_token):
    assert find_token() is None
    with pytest.raises(PublishError, match="no Hugging Face token") as e:
        publish(ckpt, "me/tiny-mlx", log=None)
    assert "\n" not in str(e.value)


def test_token_sources(no_token, monkeypatch, tmp_path):
    from huggingface_hub import constants

    assert find_token("hf_arg") == "hf_arg"
    stored = tmp_path / "token"
    stored.write_text("hf_stored\n")
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(stored))
    assert find_token() == "hf_stored"
    monkeypatch.setenv("HF_TOKEN", "hf_env")
    assert find_token() == "hf_env" and find_token("hf_arg") == "hf_arg"


def _err(folder: Path) -> str:
    with pytest.raises(PublishError) as e:
        publish(folder, "me/tiny-mlx", dry_run=True, log=None)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_folder_errors(ckpt, tmp_path):
    assert "not a folder" in _err(tmp_path / "missing")
    shard = ckpt / "model-00002-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-7])
    assert "size" in _err(ckpt) and shard.name in _err(ckpt)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit flipped
    assert "sha256 differs" in _err(ckpt)
    shard.write_bytes(data)
    rec_path = ckpt / "conversion.json"
    rec = json.loads(rec_path.read_text())
    del rec["files"]["tokenizer.json"]
    rec_path.write_text(json.dumps(rec))
    assert "tokenizer.json not listed in conversion.json" in _err(ckpt)
    rec_path.unlink()
    assert "conversion.json missing" in _err(ckpt)
    shard.unlink()
    assert "missing weight shard" in _err(ckpt)
    (ckpt / "config.json").write_text(json.dumps({"model_type": "musicgen"}))
    assert "not 'mlx-music'" in _err(ckpt)


# -- real upload against a local Hub stand-in ----------------------------------------------------

class FakeHub:
    """Just enough of the Hub API for huggingface_hub's create_repo/create_branch/upload_folder."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}      # repo_id -> {"private", "branches": {name: {path: bytes}}}
        self.lfs: dict[str, bytes] = {}       # sha256 -> bytes (LFS storage)
        self.calls: list[str] = []
        self.commits: list[dict] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 30  # a stuck client can never hang the test server thread forever

            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return out
                        out += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _send(self, status: int, obj=None) -> None:
                data = json.dumps(obj if obj is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _tree(self, repo_id: str, rev: str) -> tuple[str, dict] | None:
                repo = hub.repos.get(repo_id)
                if repo is None:
                    return None
                if rev in repo["branches"] and rev in repo.get("shas", {}):
                    return repo["shas"][rev], repo["branches"][rev]
                if rev in repo.get("by_sha", {}):
                    return rev, repo["by_sha"][rev]
                return None

            def do_HEAD(self) -> None:
                self.do_GET(head=True)

            def do_GET(self, head: bool = False) -> None:
                # Read side, for hub.resolve_model_path's snapshot_download round trip.
                from urllib.parse import unquote

                path = unquote(self.path.split("?")[0])
                hub.calls.append(f"{'HEAD' if head else 'GET'} {path}")
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
                if m:
                    found = self._tree(m.group(1), m.group(3))
                    if found is None:
                        return self._send(404, {"error": "Repository or revision not found"})
                    sha, tree = found
                    if m.group(2) == "revision":
                        return self._send(200, {"id": m.group(1), "sha": sha,
                                                "siblings": [{"rfilename": p} for p in sorted(tree)]})
                    return self._send(200, [
                        {"type": "file", "path": p, "size": len(b),
                         "oid": hashlib.sha1(b"blob %d\0" % len(b) + b).hexdigest(),
                         **({"lfs": {"oid": hashlib.sha256(b).hexdigest(), "size": len(b), "pointerSize": 134}}
                            if p.endswith(".safetensors") else {})} for p, b in sorted(tree.items())])
                m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                found = self._tree(m.group(1), m.group(2)) if m else None
                if found is None or m.group(3) not in found[1]:
                    return self._send(404, {"error": "Entry not found"})
                sha, tree = found
                data = tree[m.group(3)]
                etag = (hashlib.sha256(data).hexdigest() if m.group(3).endswith(".safetensors")
                        else hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest())
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", sha)
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def do_PUT(self) -> None:
                body = self._body()
                hub.calls.append(f"PUT {self.path}")
                m = re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", self.path)
                if not m or hashlib.sha256(body).hexdigest() != m.group(1):
                    return self._send(400, {"error": "bad LFS object"})
                with hub.lock:
                    hub.lfs[m.group(1)] = body
                self._send(200)

            def do_POST(self) -> None:
                body = self._body()
                path = self.path.split("?")[0]
                hub.calls.append(f"POST {path}")
                if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    return self._send(401, {"error": "Invalid credentials in Authorization header"})
                base = f"http://{self.headers['Host']}"
                if path == "/api/repos/create":
                    p = json.loads(body)
                    repo_id = f"{p['organization']}/{p['name']}"
                    with hub.lock:
                        if repo_id in hub.repos:
                            # The real Hub's 409 also carries the url, which create_repo(exist_ok) reads.
                            return self._send(409, {"error": "You already created this model repo",
                                                    "url": f"{base}/{repo_id}"})
                        hub.repos[repo_id] = {"private": p.get("visibility") == "private" or p.get("private"),
                                              "type": p.get("type"), "branches": {"main": {}}}
                    return self._send(200, {"url": f"{base}/{repo_id}", "name": repo_id})
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    ok = content.startswith("---\n") and "library_name: mlx" in content
                    return self._send(200 if ok else 400, {"errors": [] if ok else [{"message": "bad"}],
                                                           "warnings": []})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/(.+)", path)
                if m:
                    repo_id, action, rev = m.groups()
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    if action == "branch":
                        if rev in repo["branches"]:
                            return self._send(409, {"error": "Reference already exists"})
                        repo["branches"][rev] = dict(repo["branches"]["main"])
                        return self._send(200, {})
                    if rev not in repo["branches"]:
                        return self._send(404, {"error": f"Invalid rev id: {rev}"})
                    if action == "preupload":
                        files = json.loads(body)["files"]
                        # Exercise both paths: weights as LFS objects, small metadata inline.
                        return self._send(200, {"files": [
                            {"path": f["path"], "shouldIgnore": False, "oid": None,
                             "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular"}
                            for f in files]})
                    return self._commit(repo, rev, body, base, repo_id)
                m = re.fullmatch(r"/([^/]+/[^/]+)\.git/info/lfs/objects/batch", path)
                if m:
                    req = json.loads(body)
                    objs = [{"oid": o["oid"], "size": o["size"], "authenticated": True,
                             "actions": {"upload": {"href": f"{base}/lfs-upload/{o['oid']}"},
                                         "verify": {"href": f"{base}/lfs-verify"}}}
                            for o in req["objects"] if o["oid"] not in hub.lfs]
                    objs += [{"oid": o["oid"], "size": o["size"]} for o in req["objects"] if o["oid"] in hub.lfs]
                    return self._send(200, {"transfer": "basic", "objects": objs})
                if path == "/lfs-verify":
                    o = json.loads(body)
                    ok = len(hub.lfs.get(o["oid"], b"")) == o["size"]
                    return self._send(200 if ok else 404, {})
                self._send(404, {"error": f"not implemented: {path}"})

            def _commit(self, repo: dict, rev: str, body: bytes, base: str, repo_id: str) -> None:
                lines = [json.loads(x) for x in body.decode().splitlines() if x.strip()]
                header = lines[0]
                assert header["key"] == "header"
                tree = dict(repo["branches"][rev])
                for op in lines[1:]:
                    v = op["value"]
                    if op["key"] == "file":
                        assert v["encoding"] == "base64"
                        tree[v["path"]] = base64.b64decode(v["content"])
                    elif op["key"] == "lfsFile":
                        if v["oid"] not in hub.lfs:
                            return self._send(422, {"error": f"LFS object {v['oid']} was not uploaded"})
                        tree[v["path"]] = hub.lfs[v["oid"]]
                    else:
                        return self._send(400, {"error": f"unsupported op {op['key']}"})
                repo["branches"][rev] = tree
                oid = hashlib.sha1(body).hexdigest()
                repo.setdefault("shas", {})[rev] = oid
                repo.setdefault("by_sha", {})[oid] = tree
                hub.commits.append({"repo": repo_id, "rev": rev, "summary": header["value"]["summary"],
                                    "keys": [op["key"] for op in lines[1:]]})
                self._send(200, {"success": True, "commitOid": oid, "commitUrl": f"{base}/{repo_id}/commit/{oid}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import constants

    # Xet's CAS protocol cannot be served by a test stand-in: force the git-LFS upload path.
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        yield hub


def test_real_upload(ckpt, fake_hub, no_token):
    names = publish(ckpt, "me/tiny-mlx", private=True, token=TOKEN, endpoint=fake_hub.url, log=None,
                    commit_message="first upload")
    assert names == EXPECTED
    repo = fake_hub.repos["me/tiny-mlx"]
    assert repo["private"] and repo["type"] == "model"
    tree = repo["branches"]["main"]
    assert sorted(tree) == EXPECTED
    for name in EXPECTED:
        assert tree[name] == (ckpt / name).read_bytes(), name  # every byte arrived
    # The placeholder in the card was replaced and the record kept consistent with it.
    assert b'load("me/tiny-mlx")' in tree["README.md"] and REPO_PLACEHOLDER.encode() not in tree["README.md"]
    assert validate_folder(ckpt)  # still self-consistent after the README rewrite
    # Weights went through LFS batch + PUT + verify; metadata inline in the NDJSON commit.
    assert sum(c.startswith("PUT /lfs-upload/") for c in fake_hub.calls) == 2
    assert fake_hub.calls.count("POST /lfs-verify") == 2
    assert sorted(fake_hub.commits[0]["keys"]) == ["file"] * 5 + ["lfsFile"] * 2
    assert fake_hub.commits[0]["summary"] == "first upload"

    # Again, to a new branch of the now existing repo (create_repo exist_ok + create_branch).
    publish(ckpt, "me/tiny-mlx", token=TOKEN, endpoint=fake_hub.url, log=None, revision="v2")
    assert sorted(repo["branches"]["v2"]) == EXPECTED
    assert fake_hub.commits[-1]["rev"] == "v2"


def test_upload_bad_token(ckpt, fake_hub, no_token):
    with pytest.raises(PublishError, match="HTTP 401") as e:
        publish(ckpt, "me/tiny-mlx", token="hf_wrong", endpoint=fake_hub.url, log=None)
    assert "\n" not in str(e.value)
    assert "me/tiny-mlx" not in fake_hub.repos


def test_publish_then_resolve_online(ckpt, fake_hub, tmp_path, monkeypatch):
    """Round trip: publish, then runtime.hub downloads it (online) into a fresh HF cache; then the
    same resolves offline from that cache."""
    from huggingface_hub import constants

    from mlx_music.runtime.hub import resolve_model_path

    publish(ckpt, "me/tiny-mlx", token=TOKEN, endpoint=fake_hub.url, log=None)
    # Only HF_ENDPOINT (set by the fixture after huggingface_hub was imported) points at the stand-in.
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    folder = resolve_model_path("me/tiny-mlx", token=TOKEN)
    assert folder.parent.name == "snapshots" and str(folder).startswith(str(tmp_path / "cache"))
    assert sorted(p.name for p in folder.iterdir()) == EXPECTED
    for name in EXPECTED:
        assert (folder / name).read_bytes() == (ckpt / name).read_bytes(), name
    fake_hub.calls.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("me/tiny-mlx") == folder
    assert fake_hub.calls == []  # offline: not a single request
