from __future__ import annotations

import hashlib
import http.server
import json
import threading
from pathlib import Path

import pytest

from conftest import image_bytes, textured_image
from feedback_fixtures import closed_port
from riskva_core.errors import RiskvaError
from riskva_core.feedback.labelstudio import (UNCERTAINTY_SAMPLING, LabelStudio, LabelStudioSettings, label_config,
                                              reviews_from_tasks, send_queue, sent_marker)
from riskva_core.feedback.review_queue import Candidate, QueueConfig, build_review_queue, photo_phash, write_queue

TOKEN = "s3cr3t-token-value"


class Desk(http.server.BaseHTTPRequestHandler):
    """A local HTTP server answering as Label Studio's API does, recording what it was sent."""

    refuse = False
    seen: list[tuple[str, str, dict, object]] = []

    def _answer(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length)) if length else None
        type(self).seen.append((self.command, self.path, dict(self.headers), body))
        if self.refuse:
            return self._answer(401, {"detail": "legacy token authentication has been disabled"})
        path = self.path.split("?")[0]
        if (self.command, path) == ("GET", "/api/projects/"):
            return self._answer(200, {"count": 0, "next": None, "results": []})
        if (self.command, path) == ("POST", "/api/projects/"):
            return self._answer(201, {"id": 7, "title": body["title"]})
        if (self.command, path) == ("PATCH", "/api/projects/7/"):
            return self._answer(200, {"id": 7})
        if (self.command, path) == ("POST", "/api/storages/localfiles/"):
            return self._answer(201, {"id": 3})
        if (self.command, path) == ("POST", "/api/projects/7/import"):
            return self._answer(201, {"task_count": len(body)})
        return self._answer(404, {"detail": "Not found."})

    do_GET = do_POST = do_PATCH = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def desk():
    handler = type("DeskHandler", (Desk,), {"seen": [], "refuse": False})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield handler, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def queue_file(tmp_path) -> Path:
    photos = tmp_path / "root" / "photos"
    photos.mkdir(parents=True)
    candidates = []
    for i, conf in enumerate((0.4, None)):
        data = image_bytes(textured_image(i, (96, 72)), "JPEG")
        path = photos / f"{i}.jpg"
        path.write_bytes(data)
        candidates.append(Candidate(hashlib.sha256(data).hexdigest(), str(path), photo_phash(data), conf is not None,
                                    conf, trace_id=f"tr-{i}", model_version="3",
                                    draft={"风险": "墙面开裂", "风险等级": "中等", "纠正和预防建议": "修补", "缺陷描述": "裂缝"}
                                    if conf is not None else {}))
    path = tmp_path / "queue.json"
    write_queue(build_review_queue(candidates, [], QueueConfig(size=2, random_share=0.0)), path)
    return path


def test_an_unreachable_desk_is_one_clear_line_and_the_queue_stays(queue_file, tmp_path):
    client = LabelStudio(LabelStudioSettings(f"http://127.0.0.1:{closed_port()}", TOKEN, timeout_s=2))
    before = queue_file.read_bytes()
    with pytest.raises(RiskvaError) as err:
        send_queue(client, 7, queue_file, tmp_path / "root")
    message = str(err.value)
    assert "is unreachable" in message and "queue is kept" in message and "\n" not in message
    assert TOKEN not in message
    assert queue_file.read_bytes() == before and not sent_marker(queue_file).exists()
    with pytest.raises(RiskvaError, match="unreachable"):
        client.ensure_project("riskva review")


def test_a_refused_token_is_one_clear_line_and_the_queue_stays(desk, queue_file, tmp_path):
    handler, url = desk
    handler.refuse = True
    client = LabelStudio(LabelStudioSettings(url, TOKEN))
    before = queue_file.read_bytes()
    with pytest.raises(RiskvaError) as err:
        send_queue(client, 7, queue_file, tmp_path / "root")
    message = str(err.value)
    assert "refused the API token (HTTP 401: legacy token authentication has been disabled)" in message
    assert "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN" in message and TOKEN not in message and "\n" not in message
    assert queue_file.read_bytes() == before and not sent_marker(queue_file).exists()
    with pytest.raises(RiskvaError, match="refused the API token"):
        client.ensure_project("riskva review")


def test_the_project_storage_and_tasks_are_sent_as_label_studio_takes_them(desk, queue_file, tmp_path):
    handler, url = desk
    client = LabelStudio(LabelStudioSettings(url, TOKEN))
    project = client.ensure_project("riskva review")
    storage = client.add_local_storage(project, tmp_path / "root" / "photos")
    assert (project, storage) == (7, 3)
    assert send_queue(client, project, queue_file, tmp_path / "root") == 2
    assert send_queue(client, project, queue_file, tmp_path / "root") == 0  # never imported twice
    calls = {(m, p.split("?")[0]): body for m, p, _, body in handler.seen}
    assert all(h["Authorization"] == f"Token {TOKEN}" for _, _, h, _ in handler.seen)
    created = calls[("POST", "/api/projects/")]
    assert created["label_config"] == label_config()
    assert calls[("PATCH", "/api/projects/7/")] == {"sampling": UNCERTAINTY_SAMPLING}
    assert calls[("POST", "/api/storages/localfiles/")]["path"] == str((tmp_path / "root" / "photos").resolve())
    tasks = calls[("POST", "/api/projects/7/import")]
    first, second = tasks
    assert first["data"]["image"] == "/data/local-files/?d=photos/1.jpg"  # the parse failure leads the queue
    assert first["predictions"] == [{"model_version": "3", "score": 0.0, "result": []}]
    draft = second["predictions"][0]
    assert draft["model_version"] == "3" and draft["score"] == 0.4
    assert {"from_name": "level", "to_name": "image", "type": "choices", "value": {"choices": ["中等"]}} in draft["result"]
    assert json.loads(sent_marker(queue_file).read_text())["tasks"] == 2


def test_the_labelling_config_shows_the_photo_the_levels_and_three_text_areas():
    config = label_config()
    assert config.count("<TextArea ") == 3 and config.count("<Choice ") == 3
    for label in ("风险等级", "风险", "纠正和预防建议", "缺陷描述", "轻微", "中等", "严重"):
        assert f'value="{label}"' in config
    assert '<Image name="image" value="$image"' in config


def test_credentials_come_from_the_environment_and_never_show(monkeypatch):
    monkeypatch.delenv("LABEL_STUDIO_API_KEY", raising=False)
    monkeypatch.setenv("LABEL_STUDIO_URL", "http://127.0.0.1:8080/")
    with pytest.raises(RiskvaError, match="LABEL_STUDIO_API_KEY"):
        LabelStudioSettings.from_env()
    monkeypatch.setenv("LABEL_STUDIO_API_KEY", TOKEN)
    settings = LabelStudioSettings.from_env()
    assert settings.url == "http://127.0.0.1:8080" and settings.token == TOKEN
    assert TOKEN not in repr(settings) and TOKEN not in repr(LabelStudio(settings))


def test_annotations_become_reviews_against_the_draft():
    draft = [{"from_name": "level", "type": "choices", "value": {"choices": ["中等"]}},
             {"from_name": "risk", "type": "textarea", "value": {"text": ["墙面开裂"]}}]
    final = [{"from_name": "level", "type": "choices", "value": {"choices": ["严重"]}},
             {"from_name": "risk", "type": "textarea", "value": {"text": ["墙面开裂 "]}},
             {"from_name": "advice", "type": "textarea", "value": {"text": ["修补"]}},
             {"from_name": "description", "type": "textarea", "value": {"text": ["裂缝"]}}]
    tasks = [{"id": 11, "data": {"photo_sha256": "a" * 64, "photo_path": "/p/a.jpg", "trace_id": "tr-1"},
              "predictions": [{"model_version": "3", "score": 0.4, "result": draft}],
              "annotations": [{"id": 1, "completed_by": {"id": 2, "email": "li@site.cn"}, "result": draft,
                               "updated_at": "2025-03-04T10:00:00Z", "was_cancelled": False},
                              {"id": 2, "completed_by": 2, "result": final, "updated_at": "2025-03-04T11:00:00Z"}]},
             {"id": 12, "data": {}, "annotations": [{"id": 3, "was_cancelled": True, "result": []}]}]
    (review,) = reviews_from_tasks(tasks)
    assert review.fields["风险等级"] == "严重" and review.draft["风险等级"] == "中等" and review.model_version == "3"
    assert review.reviewer == "2" and review.reviewed_at == "2025-03-04T11:00:00Z" and review.task_id == 11
    # a trailing space is not a change; the added advice and description are
    assert review.changed_fields() == ["风险等级", "纠正和预防建议", "缺陷描述"]
