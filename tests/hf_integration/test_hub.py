"""push_to_hub against a local imitation of the Hub's HTTP API.

Only the HTTP layer is fake: the real ``huggingface_hub.HfApi`` talks HTTP to a ``http.server`` on
127.0.0.1 that answers the endpoints ``create_repo`` and ``upload_folder`` use in the installed
version: ``POST /api/repos/create``, ``POST /api/validate-yaml`` (README metadata check),
``POST /api/models/{repo}/preupload/{rev}`` and ``POST /api/models/{repo}/commit/{rev}`` (ndjson),
plus ``POST /api/models/{repo}/branch/{rev}`` for ``revision=``. The fake answers ``"regular"`` to
every preupload entry so file bytes travel base64 inside the commit; the real Hub answers ``"lfs"``
for weights and the bytes then go through hf_xet to a content-addressed store, a protocol not
imitated here. Any connection to a host other than localhost fails the test.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from hf_integration.hub import HubUploadError, push_to_hub
from hf_integration.model_card import render_model_card

REPO_ID = "me/bert-sst2-nf4"
TOKEN = "hf_test_token"


class FakeHub:
    """Records requests and keeps committed files in memory: ``files[repo_id][path] = bytes``."""

    def __init__(self) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.repos: dict[str, dict[str, Any]] = {}
        self.branches: list[tuple[str, str]] = []
        self.commits: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.auth_headers: set[str | None] = set()
        self.fail: dict[str, int] = {}  # endpoint kind -> HTTP status to answer instead
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def _handle(self, method: str) -> None:
                hub.requests.append((method, self.path))
                hub.auth_headers.add(self.headers.get("authorization"))
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                path = self.path.split("?", 1)[0]
                kind = _route(method, path)
                if kind is None:
                    hub.unexpected.append((method, self.path))
                    return self._reply(404, {"error": "not imitated"})
                if kind in hub.fail:
                    status = hub.fail[kind]
                    headers = {"X-Error-Code": "RepoNotFound"} if status == 404 else {}
                    if status == 401:
                        headers["X-Error-Message"] = "Invalid credentials in Authorization header"
                    return self._reply(status, {"error": f"fake failure {status}"}, headers)
                return self._reply(200, getattr(hub, f"_on_{kind}")(path, body))

            def _reply(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def _on_create(self, path: str, body: bytes) -> dict[str, Any]:
        payload = json.loads(body)
        repo_id = f"{payload['organization']}/{payload['name']}"
        self.repos.setdefault(repo_id, payload)
        return {"url": f"{self.url}/{repo_id}"}

    def _on_repo_info(self, path: str, body: bytes) -> dict[str, Any]:
        repo_id = path.removeprefix("/api/models/")
        return {
            "id": repo_id,
            "sha": "0" * 40,
            "private": self.repos.get(repo_id, {}).get("visibility") == "private",
        }

    def _on_validate_yaml(self, path: str, body: bytes) -> dict[str, Any]:
        return {"errors": [], "warnings": []}

    def _on_preupload(self, path: str, body: bytes) -> dict[str, Any]:
        files = json.loads(body)["files"]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}

    def _on_branch(self, path: str, body: bytes) -> dict[str, Any]:
        _, repo_id, branch = _split_repo_path(path)
        self.branches.append((repo_id, branch))
        return {}

    def _on_commit(self, path: str, body: bytes) -> dict[str, Any]:
        _, repo_id, revision = _split_repo_path(path)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = lines[0]["value"]
        files = {}
        for line in lines[1:]:
            assert line["key"] == "file", line  # every file was announced as "regular"
            assert line["value"]["encoding"] == "base64"
            files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
        self.files.setdefault(repo_id, {}).update(files)
        oid = hashlib.sha1(body).hexdigest()
        self.commits.append({"repo_id": repo_id, "revision": revision, "summary": header["summary"], "files": files})
        return {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}


def _route(method: str, path: str) -> str | None:
    parts = path.split("/")
    if method == "GET":
        # `create_repo(exist_ok=True)` asks for the repo's info after a 401/403 on create.
        return "repo_info" if len(parts) == 5 and path.startswith("/api/models/") else None
    if path == "/api/repos/create":
        return "create"
    if path == "/api/validate-yaml":
        return "validate_yaml"
    if path.startswith("/api/models/"):
        kind, _, _ = _split_repo_path(path)
        return kind if kind in ("preupload", "commit", "branch") else None
    return None


def _split_repo_path(path: str) -> tuple[str, str, str]:
    """``/api/models/me/x/commit/main`` -> ``("commit", "me/x", "main")``."""
    parts = path.split("/")
    return (parts[5], f"{parts[3]}/{parts[4]}", "/".join(parts[6:])) if len(parts) >= 7 else ("", "", "")


@pytest.fixture(autouse=True)
def _no_real_network(monkeypatch):
    """Fail on any connection or DNS lookup that is not localhost; make the default endpoint dead."""
    from huggingface_hub import constants

    attempts: list[object] = []
    local = {"127.0.0.1", "::1", "localhost"}
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        if not (isinstance(address, tuple) and address[0] in local):
            attempts.append(address)
            raise OSError(f"test tried to reach the network: {address!r}")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise OSError(f"test tried to resolve {host!r}")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    # The fake hub must be reachable, so offline mode stays off here; the guard above replaces it.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield
    assert attempts == [], f"tests must not touch the network: {attempts}"


@pytest.fixture
def hub():
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def export_dir(tmp_path: Path) -> Path:
    """A folder shaped like an export: config, small safetensors weights, model card, tokenizer files."""
    import numpy as np
    from safetensors.numpy import save_file

    out = tmp_path / "export"
    out.mkdir()
    config = {
        "architectures": ["BertForSequenceClassification"],
        "model_type": "bert",
        "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True},
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    rng = np.random.default_rng(0)
    save_file(
        {
            "classifier.weight": rng.standard_normal((2, 8), dtype=np.float32),
            "bert.encoder.weight": rng.integers(0, 255, (64, 4), dtype=np.uint8),
        },
        str(out / "model.safetensors"),
    )
    card = render_model_card(
        base_model="google-bert/bert-base-uncased",
        quant_method_summary={"format": "nf4"},
        recipe={"version": 1},
        metrics={"fp32": {"accuracy": 0.8}, "qat_nf4": {"accuracy": 0.79}},
        model_bytes=None,
        datasets=["nyu-mll/glue"],
        bits=4,
        model_name=REPO_ID,
    )
    (out / "README.md").write_text(card, encoding="utf-8")
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordPiece"}}))
    (out / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    (out / "special_tokens_map.json").write_text(json.dumps({"cls_token": "[CLS]"}))
    (out / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n")
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (files and directories, hidden ones too) with its sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
        for p in sorted(folder.rglob("*"))
    }


def _contents(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _free_port() -> int:
    """A local port nothing listens on (connections to it are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api(endpoint: str):
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint)


def test_upload_sends_exactly_the_exported_files(hub, export_dir):
    before = _snapshot(export_dir)
    url = push_to_hub(export_dir, REPO_ID, private=True, token=TOKEN, api=_api(hub.url))

    assert hub.files[REPO_ID] == _contents(export_dir)
    assert url.startswith(f"{hub.url}/{REPO_ID}/commit/")
    assert hub.repos[REPO_ID]["visibility"] == "private"
    assert [c["summary"] for c in hub.commits] == ["Upload quantized model (lightning-quant)"]
    assert [c["revision"] for c in hub.commits] == ["main"]
    assert hub.auth_headers == {f"Bearer {TOKEN}"}
    assert [_route(method, path.split("?")[0]) for method, path in hub.requests] == [
        "create",
        "validate_yaml",
        "preupload",
        "commit",
    ]
    assert _snapshot(export_dir) == before


def test_default_api_and_revision(hub, export_dir, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    push_to_hub(export_dir, REPO_ID, token=TOKEN, revision="nf4", commit_message="v1")

    assert hub.branches == [(REPO_ID, "nf4")]
    assert [(c["revision"], c["summary"]) for c in hub.commits] == [("nf4", "v1")]
    assert hub.files[REPO_ID] == _contents(export_dir)
    assert "visibility" not in hub.repos[REPO_ID] or hub.repos[REPO_ID]["visibility"] == "public"


@pytest.mark.parametrize(
    ("failing", "status", "expected"),
    [
        (
            {"create", "repo_info", "validate_yaml", "preupload", "commit"},
            401,
            "authentication failed (HTTP 401",
        ),
        ({"commit"}, 403, "authentication failed (HTTP 403"),
        ({"preupload"}, 404, "repository was not found"),
        ({"commit"}, 409, "the Hub answered HTTP 409"),
    ],
)
def test_http_failure_raises_and_keeps_folder(hub, export_dir, failing, status, expected):
    hub.fail = dict.fromkeys(failing, status)
    before = _snapshot(export_dir)

    with pytest.raises(HubUploadError) as info:
        push_to_hub(export_dir, REPO_ID, token=TOKEN, api=_api(hub.url))

    message = str(info.value)
    assert expected in message
    assert REPO_ID in message
    assert f"local folder at {export_dir} is untouched" in message
    assert "push_to_hub(" in message and "huggingface-cli upload" in message
    assert _snapshot(export_dir) == before
    assert REPO_ID not in hub.files
    assert hub.unexpected == []


def test_connection_refused_raises_and_keeps_folder(export_dir):
    before = _snapshot(export_dir)
    dead = f"http://127.0.0.1:{_free_port()}"

    with pytest.raises(HubUploadError, match="could not reach") as info:
        push_to_hub(export_dir, REPO_ID, token=TOKEN, api=_api(dead))

    assert dead in str(info.value) and "is untouched" in str(info.value)
    assert _snapshot(export_dir) == before


@pytest.mark.parametrize("first_failure", ["refused", "401"])
def test_retry_after_failure_uploads_everything(hub, export_dir, first_failure):
    before = _snapshot(export_dir)
    if first_failure == "refused":
        first_api = _api(f"http://127.0.0.1:{_free_port()}")
    else:
        first_api = _api(hub.url)
        hub.fail = {"commit": 401}  # repo gets created, preupload works, the commit is refused
    with pytest.raises(HubUploadError):
        push_to_hub(export_dir, REPO_ID, token=TOKEN, api=first_api)
    assert REPO_ID not in hub.files and _snapshot(export_dir) == before

    hub.fail = {}
    url = push_to_hub(export_dir, REPO_ID, token=TOKEN, api=_api(hub.url))

    assert hub.files[REPO_ID] == _contents(export_dir)
    assert len(hub.commits) == 1 and url.startswith(f"{hub.url}/{REPO_ID}/commit/")
    assert _snapshot(export_dir) == before


@pytest.mark.parametrize(
    ("remove", "match"),
    [
        ("config.json", "has no `config.json`"),
        ("model.safetensors", r"has no weights \(`\*.safetensors` or `pytorch_model.bin`\)"),
        ("README.md", "has no `README.md`.*render_model_card"),
    ],
)
def test_incomplete_export_is_rejected_before_any_request(hub, export_dir, remove, match):
    (export_dir / remove).unlink()
    with pytest.raises(ValueError, match=match):
        push_to_hub(export_dir, REPO_ID, token=TOKEN, api=_api(hub.url))
    assert hub.requests == []


def test_pytorch_bin_weights_are_accepted(hub, export_dir):
    (export_dir / "model.safetensors").rename(export_dir / "pytorch_model.bin")
    push_to_hub(export_dir, REPO_ID, token=TOKEN, api=_api(hub.url))
    assert set(hub.files[REPO_ID]) == set(_contents(export_dir))


def test_missing_folder_and_bad_repo_id(hub, tmp_path, export_dir):
    with pytest.raises(ValueError, match="is not a folder"):
        push_to_hub(tmp_path / "nope", REPO_ID, api=_api(hub.url))
    with pytest.raises(ValueError):
        push_to_hub(export_dir, "not a/valid/repo id", api=_api(hub.url))
    assert hub.requests == []
