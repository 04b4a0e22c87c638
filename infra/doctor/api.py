"""Talking to Google for ``sr cloud doctor``: authorized JSON requests with the user's
application-default credentials.

Every request goes to ``https://HOST/PATH``; with ``SR_GOOGLE_API_ROOT=http://H:P`` set
it goes to ``http://H:P/HOST/PATH`` instead (the tests serve recorded API responses
there)."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass

from sr_core.errors import short_reason

API_ROOT_VARIABLE = "SR_GOOGLE_API_ROOT"
"""Overrides ``https://`` for every Google API host (a recorded-API server in tests)."""

SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]


@dataclass
class Reply:
    status: int
    data: dict
    headers: dict

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        error = self.data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return short_reason(error["message"], None)
        errors = self.data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict):
            return str(errors[0].get("message") or errors[0].get("code"))
        return f"HTTP {self.status}"


class Api:
    """Authorized JSON requests to Google's APIs (google-auth's requests session, which
    refreshes the access token from the credentials file's token endpoint)."""

    def __init__(self, credentials, root: str | None = None, timeout: float = 30.0):
        from google.auth.transport.requests import AuthorizedSession

        self.root = (root if root is not None else os.environ.get(API_ROOT_VARIABLE, "")).rstrip("/")
        token_uri = getattr(credentials, "token_uri", None)
        if self.root and token_uri and hasattr(credentials, "with_token_uri"):
            # The token endpoint is one more Google host: it moves with the others.
            credentials = credentials.with_token_uri(self.url(token_uri))
        self.session = AuthorizedSession(credentials)
        self.credentials = credentials
        self.timeout = timeout

    def url(self, url: str) -> str:
        if self.root and url.startswith("https://"):
            return f"{self.root}/{url.removeprefix('https://')}"
        return url

    def call(self, method: str, url: str, json_body: dict | None = None, authorized: bool = True,
             headers: dict | None = None) -> Reply:
        import google.auth.exceptions
        import requests

        target = self.url(url)
        sender = self.session if authorized else requests
        try:
            response = sender.request(method, target, json=json_body, headers=headers or {}, timeout=self.timeout)
        except google.auth.exceptions.RefreshError as exc:
            raise ValueError(f"your Google Cloud credentials were refused ({short_reason(exc)}): run "
                             "`gcloud auth application-default login`") from None
        except (requests.ConnectionError, requests.Timeout, google.auth.exceptions.TransportError) as exc:
            host = urllib.parse.urlsplit(url).netloc
            why = "timed out" if isinstance(exc, requests.Timeout) else "no connection"
            raise ConnectionError(f"cannot reach {host} ({why}); nothing was changed, rerun when the network "
                                  "is back") from None
        try:
            data = response.json()
        except ValueError:
            data = {}
        return Reply(response.status_code, data if isinstance(data, dict) else {"items": data}, response.headers)

    def get(self, url: str, **kw) -> Reply:
        return self.call("GET", url, **kw)

    def post(self, url: str, body: dict | None = None) -> Reply:
        return self.call("POST", url, json_body=body or {})

    def token(self) -> str:
        if not self.credentials.valid:
            from google.auth.transport.requests import Request

            self.credentials.refresh(Request())
        return self.credentials.token


def load_credentials(path: str):
    import google.auth
    import google.auth.exceptions

    try:
        credentials, _ = google.auth.load_credentials_from_file(path, scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as exc:
        raise ValueError(f"{path}: not usable Google credentials ({short_reason(exc)})") from None
    return credentials
