"""A stand-in for an Argilla 2.x server, just enough for the ``argilla`` SDK to create a dataset,
publish it and log records (``rg.Dataset.from_disk``), served through an ``httpx.MockTransport``
so that the real SDK code runs without a network.  Endpoints and response shapes follow what the
SDK 2.8 calls (``/api/v1/me``, ``/api/v1/me/workspaces``, ``/api/v1/me/datasets``,
``/api/v1/datasets/{id}/fields|questions|metadata-properties|vectors-settings``, ``publish``,
``records/bulk``, ``GET /api/v1/datasets/{id}/records`` with ``include=responses``, and
``POST /api/v1/records/{id}/responses``: a reviewer's submission); anything else answers 404 so that
a change in the SDK shows up as a failure.  Like the server, every record and every response carries
``inserted_at`` / ``updated_at`` (UTC, written without a zone) and its own ``id``; a record keeps the
``external_id`` it was logged with (the SDK's record id)."""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

NOW = "2026-11-21T09:00:00"
URL = "http://argilla.test"


@dataclass
class FakeArgilla:
    workspace: dict[str, Any] = field(default_factory=lambda: {"id": str(uuid.uuid4()), "name": "argilla",
                                                               "inserted_at": NOW, "updated_at": NOW})
    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    children: dict[tuple[str, str], list[dict[str, Any]]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)
    now: str = NOW  # the server's clock for the responses it stores (a test moves it between submissions)

    def records(self, name: str) -> list[dict[str, Any]]:
        did = next(d["id"] for d in self.datasets.values() if d["name"] == name)
        return self.children.get((did, "records"), [])

    def handle(self, req: httpx.Request) -> httpx.Response:
        path, method = req.url.path, req.method
        body = json.loads(req.content) if req.content else None
        self.calls.append((method, path))
        stamp = {"inserted_at": NOW, "updated_at": NOW}
        if path == "/api/v1/me":
            return httpx.Response(200, json={"id": str(uuid.uuid4()), "username": "owner", "role": "owner",
                                             "first_name": "owner", "last_name": None, **stamp})
        if path in ("/api/v1/me/workspaces", "/api/v1/workspaces"):
            return httpx.Response(200, json={"items": [self.workspace]})
        if path == f"/api/v1/workspaces/{self.workspace['id']}":
            return httpx.Response(200, json=self.workspace)
        if path in ("/api/v1/me/datasets", "/api/v1/datasets"):
            if method == "GET":
                return httpx.Response(200, json={"items": list(self.datasets.values())})
            ds = {**body, "id": str(uuid.uuid4()), "status": "draft", "last_activity_at": NOW, **stamp}
            self.datasets[ds["id"]] = ds
            return httpx.Response(201, json=ds)
        m = re.fullmatch(r"/api/v1/(?:me/)?datasets/([^/]+)(?:/(.+))?", path)
        if m and m[1] in self.datasets:
            did, sub = m[1], m[2]
            ds = self.datasets[did]
            if sub is None:
                if method == "PATCH":
                    ds.update({k: v for k, v in body.items() if k in ("guidelines", "allow_extra_metadata", "distribution")})
                return httpx.Response(200, json=ds)
            if sub == "publish":
                ds["status"] = "ready"
                return httpx.Response(200, json=ds)
            if sub == "records/bulk":
                items = []
                for r in body["items"]:
                    rid = str(uuid.uuid4())
                    responses = [self._response(x, rid) for x in r.get("responses") or []]
                    items.append({**r, "id": rid, "dataset_id": did, "status": "pending", "responses": responses, **stamp})
                self.children.setdefault((did, "records"), []).extend(items)
                return httpx.Response(200, json={"items": items, "total": len(items)})
            if sub == "records" and method == "GET":  # responses only when asked for (include=responses)
                include = req.url.params.get_list("include")
                items = [r if "responses" in include else {k: v for k, v in r.items() if k != "responses"}
                         for r in self.children.get((did, "records"), [])]
                return httpx.Response(200, json={"items": items, "total": len(items)})
            if method == "POST":
                item = {**body, "id": str(uuid.uuid4()), "dataset_id": did, **stamp}
                self.children.setdefault((did, sub), []).append(item)
                return httpx.Response(201, json=item)
            if method == "GET":
                return httpx.Response(200, json={"items": self.children.get((did, sub), [])})
        m = re.fullmatch(r"/api/v1/records/([^/]+)/responses", path)
        if m and method == "POST":  # a reviewer submits (or saves a draft of) an answer to a record
            rec = next((r for (_, sub), items in self.children.items() if sub == "records" for r in items
                        if r["id"] == m[1]), None)
            if rec is not None:
                response = self._response(body, rec["id"])
                rec.setdefault("responses", []).append(response)
                return httpx.Response(201, json=response)
        return httpx.Response(404, json={"detail": f"not in the fake server: {method} {path}"})

    def _response(self, body: dict[str, Any], record_id: str) -> dict[str, Any]:
        """A response as the server stores and lists it."""
        return {"id": str(uuid.uuid4()), "values": body.get("values"), "status": body.get("status"),
                "record_id": record_id, "user_id": body.get("user_id"), "inserted_at": self.now, "updated_at": self.now}

    def client(self):
        import argilla as rg

        return rg.Argilla(api_url=URL, api_key="test-key", mounts={URL: httpx.MockTransport(self.handle)})
