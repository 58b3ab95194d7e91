"""Label Studio as the review desk, over its HTTP API with ``requests``.

Why HTTP and not the SDK: Label Studio 1.23.2 cannot share the project's venv (it pins Django 5.2,
``openai<2``, ``pyarrow<25`` and ``pytz<2023``), and its SDK (``label-studio-sdk`` 2.1.2) would
downgrade numpy to 2.2; the server runs in its own venv (``make labelstudio``) and this client
needs nothing beyond ``requests``.

Facts about the server this module relies on (measured in issue 28, Label Studio 1.23.2):

- It starts headless with ``LABEL_STUDIO_USERNAME``/``PASSWORD``/``USER_TOKEN``; a preset token
  needs ``LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true`` at the *first* start, else every call is a
  401 "legacy token authentication has been disabled". A legacy token is sent as
  ``Authorization: Token <t>``; a personal access token (a JWT refresh token) is exchanged at
  ``POST /api/token/refresh`` for an access token sent as ``Bearer``. This client takes either.
- ``label-studio start --no-browser --internal-host 127.0.0.1 --port N``, ``COLLECT_ANALYTICS=false``.
  It takes ~55 s to the first ``/health`` on a fresh SQLite database and ~5 s on an existing one,
  and it silently moves to the next port when the port is busy: check ``/health`` on the port
  you meant before trusting it.
- Local files are served (``/data/local-files/?d=<path under the document root>``) only with
  ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true``, ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``
  set, and after a local-files import storage is registered for the folder
  (``POST /api/storages/localfiles/``).
- Paths as Label Studio routes them (Django, so the trailing slash matters: a POST without it
  would be redirected as a GET): ``/api/projects/``, ``/api/projects/<id>/``,
  ``/api/projects/<id>/import``, ``/api/projects/<id>/export``, ``/api/storages/localfiles/``.
- Predictions imported with the tasks (``POST /api/projects/<id>/import``) are the pre-annotation
  the inspector edits; their ``score`` drives "Uncertainty sampling" (lowest score first).

Credentials come from the environment (``LABEL_STUDIO_URL``, ``LABEL_STUDIO_API_KEY``), are never
logged, and are masked in ``repr``. Every failure is a one-line ``RiskvaError``; nothing is marked
sent unless the import succeeded, so the review queue stays for the next try.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence
from xml.sax.saxutils import quoteattr

from riskva_core import atomic
from riskva_core.errors import RiskvaError
from riskva_core.feedback.review_queue import read_queue
from riskva_core.feedback.reviews import Review
from riskva_core.schema import FIELD_ADVICE, FIELD_DESC, FIELD_LEVEL, FIELD_RISK, FIELDS, LEVELS

ENV_URL = "LABEL_STUDIO_URL"
ENV_TOKEN = "LABEL_STUDIO_API_KEY"
UNCERTAINTY_SAMPLING = "Uncertainty sampling"
IMAGE_CONTROL = "image"
# Control names are ASCII (they are keys in the API's JSON); the inspector sees the Chinese headers.
CONTROLS = {FIELD_LEVEL: "level", FIELD_RISK: "risk", FIELD_ADVICE: "advice", FIELD_DESC: "description"}
_KEPT = "the review queue is kept for the next try"


def label_config() -> str:
    """The labelling view: the photo, 风险等级 as a single choice, the three text fields as text areas."""
    choices = "".join(f"<Choice value={quoteattr(level)}/>" for level in LEVELS)
    parts = [f'<View><Image name="{IMAGE_CONTROL}" value="$image" zoom="true" zoomControl="true"/>',
             f"<Header value={quoteattr(FIELD_LEVEL)}/>",
             f'<Choices name="{CONTROLS[FIELD_LEVEL]}" toName="{IMAGE_CONTROL}" choice="single" required="true" '
             f'showInline="true">{choices}</Choices>']
    for field in (FIELD_RISK, FIELD_ADVICE, FIELD_DESC):
        parts += [f"<Header value={quoteattr(field)}/>",
                  f'<TextArea name="{CONTROLS[field]}" toName="{IMAGE_CONTROL}" editable="true" required="true" '
                  f'maxSubmissions="1" rows="3"/>']
    return "".join(parts) + "</View>"


def prediction(draft: Mapping[str, str], model_version: str, score: float) -> dict[str, Any]:
    """The model's draft as a Label Studio prediction (the pre-annotation the inspector edits)."""
    result = []
    if draft.get(FIELD_LEVEL) in LEVELS:
        result.append({"from_name": CONTROLS[FIELD_LEVEL], "to_name": IMAGE_CONTROL, "type": "choices",
                       "value": {"choices": [draft[FIELD_LEVEL]]}})
    for field in (FIELD_RISK, FIELD_ADVICE, FIELD_DESC):
        if draft.get(field):
            result.append({"from_name": CONTROLS[field], "to_name": IMAGE_CONTROL, "type": "textarea",
                           "value": {"text": [draft[field]]}})
    return {"model_version": model_version or "unknown", "score": float(score), "result": result}


def fields_from_result(result: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """An annotation's (or prediction's) result list back to the four fields ("" where absent)."""
    by_control = {name: field for field, name in CONTROLS.items()}
    out = {f: "" for f in FIELDS}
    for item in result:
        field = by_control.get(item.get("from_name", ""))
        value = item.get("value") or {}
        if field == FIELD_LEVEL:
            out[field] = (value.get("choices") or [""])[0]
        elif field is not None:
            out[field] = "\n".join(value.get("text") or [])
    return out


@dataclasses.dataclass(frozen=True)
class LabelStudioSettings:
    url: str
    token: str = dataclasses.field(repr=False)
    timeout_s: float = 10.0

    def __repr__(self) -> str:  # the token never reaches a log line or a traceback's locals
        return f"LabelStudioSettings(url={self.url!r}, token='***', timeout_s={self.timeout_s})"

    @classmethod
    def from_env(cls) -> "LabelStudioSettings":
        url, token = os.environ.get(ENV_URL, "").strip(), os.environ.get(ENV_TOKEN, "").strip()
        if not url or not token:
            raise RiskvaError(f"Label Studio needs ${ENV_URL} and ${ENV_TOKEN} (a legacy token or a personal "
                              f"access token); {_KEPT}")
        return cls(url.rstrip("/"), token)


class LabelStudio:
    """The calls the review loop makes; each raises a one-line RiskvaError on failure."""

    def __init__(self, settings: LabelStudioSettings):
        import requests

        self.settings = settings
        self._session = requests.Session()
        self._auth: str | None = None

    def __repr__(self) -> str:
        return f"LabelStudio({self.settings!r})"

    # --- plumbing ---------------------------------------------------------------------------
    def _authorization(self) -> str:
        if self._auth is None:
            token = self.settings.token
            if token.count(".") == 2:  # a JWT: a personal access token, exchanged for an access token
                access = self._send("POST", "/api/token/refresh", {}, json={"refresh": token}).get("access")
                if not access:
                    raise RiskvaError(f"Label Studio at {self.settings.url} did not exchange the personal access "
                                      f"token for an access token; {_KEPT}")
                self._auth = f"Bearer {access}"
            else:
                self._auth = f"Token {token}"
        return self._auth

    def _send(self, method: str, path: str, headers: Mapping[str, str], **kwargs: Any) -> Any:
        import requests

        where = f"Label Studio at {self.settings.url}"
        try:
            resp = self._session.request(method, self.settings.url + path, headers=dict(headers),
                                         timeout=self.settings.timeout_s, allow_redirects=False, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise RiskvaError(f"{where} is unreachable ({type(exc).__name__}): start it (`make labelstudio`) or set "
                              f"${ENV_URL}; nothing was sent, {_KEPT}") from None
        if resp.status_code in (401, 403):
            raise RiskvaError(f"{where} refused the API token (HTTP {resp.status_code}: {_detail(resp)}); set "
                              f"${ENV_TOKEN} (a legacy token needs LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true at the "
                              f"server's first start); nothing was sent, {_KEPT}")
        if 300 <= resp.status_code < 400:  # followed, a POST would silently become a GET
            raise RiskvaError(f"{where}: {method} {path} was redirected (HTTP {resp.status_code} to "
                              f"{resp.headers.get('Location', '?')}); set ${ENV_URL} to the server's own address; {_KEPT}")
        if resp.status_code >= 400:
            raise RiskvaError(f"{where}: {method} {path} failed (HTTP {resp.status_code}: {_detail(resp)}); {_KEPT}")
        if not resp.content:
            return {}
        try:
            return resp.json()
        except ValueError:
            raise RiskvaError(f"{where}: {method} {path} answered with something other than JSON; {_KEPT}") from None

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._send(method, path, {"Authorization": self._authorization()}, **kwargs)

    # --- the review loop's calls ---------------------------------------------------------------
    def find_project(self, title: str) -> int | None:
        page, found = 1, None
        while found is None:
            data = self._call("GET", "/api/projects/", params={"page": page, "page_size": 100})
            items = data.get("results", []) if isinstance(data, dict) else data
            found = next((int(p["id"]) for p in items if p.get("title") == title), None)
            if not (isinstance(data, dict) and data.get("next")):
                break
            page += 1
        return found

    def create_project(self, title: str, description: str = "") -> int:
        data = self._call("POST", "/api/projects/", json={"title": title, "description": description,
                                                         "label_config": label_config(),
                                                         "show_collab_predictions": True})
        return int(data["id"])

    def ensure_project(self, title: str, description: str = "") -> int:
        """The project named ``title`` (created with the labelling config if absent), sampling by uncertainty."""
        project = self.find_project(title)
        if project is None:
            project = self.create_project(title, description)
        self.set_sampling(project)
        return project

    def set_sampling(self, project: int, sampling: str = UNCERTAINTY_SAMPLING) -> None:
        self._call("PATCH", f"/api/projects/{project}/", json={"sampling": sampling})

    def add_local_storage(self, project: int, folder: str | Path, title: str = "riskva field photos") -> int:
        """Register ``folder`` (under the server's document root) so its files are served to the desk."""
        data = self._call("POST", "/api/storages/localfiles/",
                          json={"project": project, "title": title, "path": str(Path(folder).resolve()),
                                "use_blob_urls": True, "regex_filter": r".*\.(jpe?g|png|webp|bmp|gif|tiff?)$"})
        return int(data["id"])

    def ensure_local_storage(self, project: int, folder: str | Path) -> int:
        """The project's local storage for ``folder``, registered once (a second one would list twice)."""
        path = str(Path(folder).resolve())
        found = self._call("GET", "/api/storages/localfiles/", params={"project": project})
        for storage in found if isinstance(found, list) else found.get("results", []):
            if storage.get("path") == path:
                return int(storage["id"])
        return self.add_local_storage(project, folder)

    def progress(self, project: int) -> dict[str, int]:
        """How far the review is: tasks on the desk and tasks with at least one submitted annotation."""
        data = self._call("GET", f"/api/projects/{project}/")
        return {"tasks": int(data.get("task_number") or 0),
                "reviewed": int(data.get("num_tasks_with_annotations") or 0)}

    def import_tasks(self, project: int, tasks: Sequence[Mapping[str, Any]]) -> int:
        data = self._call("POST", f"/api/projects/{project}/import", json=list(tasks))
        return int(data.get("task_count", len(tasks)))

    def completed_tasks(self, project: int) -> list[dict[str, Any]]:
        """Tasks with at least one annotation, with their annotations and predictions (JSON export)."""
        data = self._call("GET", f"/api/projects/{project}/export", params={"exportType": "JSON"})
        tasks = [t for t in data if t.get("annotations")] if isinstance(data, list) else []
        for task in tasks:  # Label Studio 1.23's export lists predictions by id: fetch the drafts themselves
            task["predictions"] = [self._call("GET", f"/api/predictions/{p}/") if isinstance(p, int) else p
                                   for p in task.get("predictions") or []]
        return tasks


def _detail(resp: Any) -> str:
    try:
        body = resp.json()
        text = body.get("detail") or body.get("message") or json.dumps(body, ensure_ascii=False)
    except ValueError:
        text = resp.text
    return " ".join(str(text).split())[:200] or resp.reason or "no detail"


def local_url(photo: str | Path, document_root: str | Path) -> str:
    """The desk's URL of a photo under the server's ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``."""
    try:
        relative = Path(photo).resolve().relative_to(Path(document_root).resolve())
    except ValueError:
        raise RiskvaError(f"{photo} is outside Label Studio's document root {document_root}; {_KEPT}") from None
    return f"/data/local-files/?d={relative.as_posix()}"


def queue_tasks(queue: Mapping[str, Any], document_root: str | Path) -> list[dict[str, Any]]:
    """A review queue (review_queue.write_queue's JSON) as tasks with the model's draft as prediction."""
    tasks = []
    for e in queue["entries"]:
        score = e["level_confidence"] if e.get("level_confidence") is not None else 0.0
        tasks.append({"data": {"image": local_url(e["photo_path"], document_root), "photo_sha256": e["photo_sha256"],
                               "photo_path": e["photo_path"], "trace_id": e.get("trace_id", ""),
                               "model_version": e.get("model_version", ""), "queue_reason": e["reason"],
                               "queue_rank": e["rank"]},
                      "predictions": [prediction(e.get("draft") or {}, e.get("model_version", ""), score)]})
    return tasks


def sent_marker(queue_path: str | Path) -> Path:
    path = Path(queue_path)
    return path.with_name(path.stem + ".sent.json")


def send_queue(client: LabelStudio, project: int, queue_path: str | Path, document_root: str | Path) -> int:
    """Import a queue's photos as tasks. Only after the import succeeded is ``<queue>.sent.json``
    written; the queue file itself is never touched, so a failed send is retried as it was."""
    marker = sent_marker(queue_path)
    if marker.is_file():
        return 0  # already on the desk: importing again would duplicate every task
    tasks = queue_tasks(read_queue(queue_path), document_root)
    count = client.import_tasks(project, tasks) if tasks else 0
    atomic.write_json(marker, {"project": project, "tasks": count,
                               "sent_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})
    return count


def reviews_from_tasks(tasks: Sequence[Mapping[str, Any]]) -> list[Review]:
    """Each task's newest submitted (not skipped) annotation against its draft."""
    out = []
    for task in tasks:
        done = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not done:
            continue
        latest = max(done, key=lambda a: (a.get("updated_at") or a.get("created_at") or "", a.get("id", 0)))
        data = task.get("data") or {}
        drafts = task.get("predictions") or []
        draft = fields_from_result(drafts[-1].get("result") or []) if drafts else {f: "" for f in FIELDS}
        who = latest.get("completed_by")
        reviewer = (who.get("email") or str(who.get("id", ""))) if isinstance(who, dict) else str(who or "")
        out.append(Review(photo_sha256=data.get("photo_sha256", ""), photo_path=data.get("photo_path", ""),
                          fields=fields_from_result(latest.get("result") or []), draft=draft,
                          model_version=(drafts[-1].get("model_version") if drafts else None)
                          or data.get("model_version", ""), reviewer=reviewer,
                          reviewed_at=latest.get("updated_at") or latest.get("created_at") or "",
                          task_id=task.get("id"), trace_id=data.get("trace_id", "")))
    return out
