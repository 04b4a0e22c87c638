"""Recorded Google Cloud API responses, served over real HTTP on 127.0.0.1 for
``sr cloud doctor`` (which sends every request for ``https://HOST/PATH`` to
``ROOT/HOST/PATH`` when ``SR_GOOGLE_API_ROOT=ROOT`` is set).

The folder holds one JSON file per request, named after its URL path:
``FOLDER/compute.googleapis.com/compute/v1/projects/P/regions/R.json`` answers
``GET https://compute.googleapis.com/compute/v1/projects/P/regions/R``, whatever the
query string. A file whose JSON is a Google error (``{"error": {"code": 403, ...}}``)
is served with that status; a path without a file gets Google's 404. Like the real
services it checks credentials: the OAuth token endpoint
(``oauth2.googleapis.com/token.json``) hands out an access token for the refresh token
of the test's credentials file, every API wants that token as a bearer, and a Docker
registry (``*-docker.pkg.dev``) speaks the Docker Registry v2 token protocol: 401 with
a ``WWW-Authenticate`` challenge, a registry token from ``HOST/v2/token.json`` for
``oauth2accesstoken`` and the access token, then the manifest for that registry token.
``requests`` lists what was asked (method, path, Authorization scheme).
"""

from __future__ import annotations

import base64
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REFRESH_TOKEN = "1//recorded-refresh-token"
"""What the test's authorized_user credentials file holds."""


def not_found(path: str) -> dict:
    return {"error": {"code": 404, "message": f"The resource '{path}' was not found", "status": "NOT_FOUND",
                      "errors": [{"message": f"The resource '{path}' was not found", "domain": "global",
                                  "reason": "notFound"}]}}


class RecordedApis:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.requests: list[tuple[str, str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "RecordedApis":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def credentials_file(self, path: Path) -> Path:
        """An application-default credentials file as `gcloud auth application-default
        login` writes it."""
        path.write_text(json.dumps({
            "account": "", "client_id": "764086051850-recorded.apps.googleusercontent.com",
            "client_secret": "d-FL95Q19q7MQmFpd7hHD0Ty", "quota_project_id": "my-project",
            "refresh_token": REFRESH_TOKEN, "type": "authorized_user", "universe_domain": "googleapis.com"}))
        return path

    def _load(self, relative: str) -> dict | None:
        file = self.folder / f"{relative}.json"
        return json.loads(file.read_text()) if file.is_file() else None

    def _access_token(self) -> str:
        return self._load("oauth2.googleapis.com/token")["access_token"]

    def _handler(self):
        apis = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest's output clean
                pass

            def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json; charset=UTF-8")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = urllib.parse.urlsplit(self.path).path
                auth = self.headers.get("Authorization", "")
                apis.requests.append((self.command, path, auth.split(" ", 1)[0]))
                host, _, rest = path.lstrip("/").partition("/")
                if f"{host}/{rest}" == "oauth2.googleapis.com/token":
                    form = urllib.parse.parse_qs(body.decode())
                    if form.get("grant_type") != ["refresh_token"] or form.get("refresh_token") != [REFRESH_TOKEN]:
                        return self._send(400, {"error": "invalid_grant", "error_description": "Bad Request"})
                    return self._send(200, apis._load("oauth2.googleapis.com/token"))
                if host.endswith("-docker.pkg.dev"):
                    return self._registry(host, rest, auth)
                if auth != f"Bearer {apis._access_token()}":
                    return self._send(401, {"error": {
                        "code": 401, "status": "UNAUTHENTICATED",
                        "message": "Request is missing required authentication credential."}})
                answer = apis._load(f"{host}/{rest}")
                if answer is None:
                    return self._send(404, not_found(path))
                error = answer.get("error")
                status = error["code"] if isinstance(error, dict) and isinstance(error.get("code"), int) else 200
                return self._send(status, answer)

            def _registry(self, host: str, rest: str, auth: str) -> None:
                token = apis._load(f"{host}/v2/token")
                if rest == "v2/token":
                    login = base64.b64encode(f"oauth2accesstoken:{apis._access_token()}".encode()).decode()
                    if auth != f"Basic {login}":
                        return self._send(401, {"errors": [{"code": "UNAUTHORIZED", "message": "login failed"}]})
                    return self._send(200, token)
                if auth != f"Bearer {token['token']}":
                    repository = rest.removeprefix("v2/").rsplit("/manifests/", 1)[0]
                    challenge = (f'Bearer realm="https://{host}/v2/token",service="{host}",'
                                 f'scope="repository:{repository}:pull"')
                    return self._send(401, {"errors": [{"code": "UNAUTHORIZED",
                                                        "message": "authentication required"}]},
                                      {"WWW-Authenticate": challenge})
                answer = apis._load(f"{host}/{rest}")
                if answer is None:
                    tag = rest.rsplit("/", 1)[-1]
                    return self._send(404, {"errors": [{"code": "MANIFEST_UNKNOWN",
                                                        "message": f'Failed to fetch "{tag}"'}]})
                return self._send(200, answer)

            do_GET = do_POST = _serve

        return Handler
