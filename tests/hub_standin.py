"""A local stand-in for the parts of the Hugging Face Hub HTTP API that ``create_repo`` + ``upload_folder`` use.

Started by a test on 127.0.0.1 (``HF_ENDPOINT`` points at it); nothing leaves the machine. It answers every
pre-upload with ``uploadMode: regular`` so files arrive base64-encoded inside the NDJSON commit, which it
decodes and keeps in memory for the test to compare with the local export.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Repo:
    repo_id: str
    private: bool
    files: dict[str, bytes] = field(default_factory=dict)
    commits: list[str] = field(default_factory=list)


class HubStandIn:
    """``with HubStandIn(token="hf_x", writable_orgs={"me"}) as hub: ...`` then inspect ``hub.repos``.

    ``token_role`` is what ``whoami`` says of the token (``write``, ``read``, ``fineGrained``); a ``read``
    token is refused every write, as the Hub does. Orgs in ``private_orgs`` make new repos private unless the
    create request asks for a visibility (an organisation's private-by-default setting); ``created`` keeps
    every create-repo request's JSON body."""

    def __init__(self, token: str, writable_orgs: set[str], token_role: str = "write",
                 private_orgs: set[str] | None = None):
        self.token = token
        self.token_role = token_role
        self.writable_orgs = writable_orgs
        self.private_orgs = private_orgs or set()
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []  # "METHOD path", for assertions on what the client did
        self.created: list[dict] = []  # create-repo request bodies
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status >= 400:
                    self.send_header("X-Error-Message", body.get("error", ""))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

            def do_GET(self):
                hub.requests.append(f"GET {self.path}")
                if self.path.split("?")[0] == "/api/whoami-v2":
                    if not self._authorised():
                        return
                    return self._reply(200, {"type": "user", "name": "me",
                                             "orgs": [{"name": o, "roleInOrg": "write"} for o in hub.writable_orgs],
                                             "auth": {"type": "access_token",
                                                      "accessToken": {"displayName": "t", "role": hub.token_role}}})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/.*)?", self.path.split("?")[0])
                if m and m.group(1) in hub.repos:
                    repo = hub.repos[m.group(1)]
                    return self._reply(200, {"id": repo.repo_id, "private": repo.private, "sha": "0" * 40,
                                             "siblings": [{"rfilename": f} for f in repo.files]})
                self._reply(404, {"error": "Repository not found"})

            def do_POST(self):
                path = self.path.split("?")[0]
                hub.requests.append(f"POST {path}")
                body = self._body()
                if not self._authorised():
                    return
                if hub.token_role == "read" and path != "/api/validate-yaml":
                    return self._reply(403, {"error": "This token is read-only"})
                if path == "/api/validate-yaml":  # upload_folder checks README.md's metadata first
                    return self._reply(200, {"errors": [], "warnings": []})
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    hub.created.append(payload)
                    org = payload.get("organization") or "me"
                    repo_id = f"{org}/{payload['name']}"
                    if org not in hub.writable_orgs:
                        return self._reply(403, {"error": f"You don't have the rights to create a model under {org}"})
                    if repo_id in hub.repos:
                        return self._reply(409, {"error": "You already created this model repo",
                                                 "url": f"{hub.url}/{repo_id}"})
                    asked = payload.get("visibility") or {True: "private", False: "public"}.get(payload.get("private"))
                    hub.repos[repo_id] = Repo(repo_id, private=asked == "private" if asked else org in hub.private_orgs)
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if not m or m.group(1) not in hub.repos:
                    return self._reply(404, {"error": "Repository not found"})
                repo = hub.repos[m.group(1)]
                if m.group(2) == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular",
                                                        "shouldIgnore": False} for f in files]})
                for line in body.splitlines():
                    item = json.loads(line)
                    if item["key"] == "file":
                        repo.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                    elif item["key"] == "header":
                        repo.commits.append(item["value"]["summary"])
                    elif item["key"] != "deletedFile":
                        return self._reply(400, {"error": f"stand-in does not support {item['key']}"})
                oid = hashlib.sha1(body).hexdigest()
                self._reply(200, {"commitUrl": f"{hub.url}/{repo.repo_id}/commit/{oid}", "commitOid": oid,
                                  "pullRequestUrl": None})

        return Handler
