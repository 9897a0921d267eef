"""The API's documentation: ``/docs`` and ``/redoc`` load nothing from outside the service (they render on a network
that reaches nothing else), and ``/openapi.json`` documents every error answer, parameter and field.

Run as a script (``python test_api_docs.py FOLDER [BROWSER]``), this module is what runs inside a network namespace
of its own: it brings the loopback up, starts ``callbridge serve`` there and fetches the pages and their assets (and,
given a Chromium, renders both pages in it).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
from pydantic import BaseModel

from callbridge.api import rest, webhooks
from callbridge.api.app import create_app
from callbridge.api.docs import ErrorBody, ValidationErrorBody
from callbridge.config import Settings
from callbridge.core import transcript
from callbridge.store import repository

BASE_URL = "http://callbridge.test"
API_TOKEN = "docs-api-token"
PAGES = ("/docs", "/redoc")
CONTENT_TYPES = {
    ".js": ("text/javascript", "application/javascript"),
    ".css": ("text/css",),
    ".png": ("image/png",),
    ".json": ("application/json",),
}


class _References(HTMLParser):
    """The URLs a page loads: scripts, style sheets, icons, images, and the OpenAPI document its script fetches."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        for attribute in ("src", "href", "spec-url"):
            value = named.get(attribute)
            if value is not None and (tag != "a" or attribute != "href"):  # a link is followed by no one
                self.urls.append(value)

    def handle_data(self, data: str) -> None:
        for line in data.splitlines():  # Swagger UI's bootstrap: ``url: '/openapi.json',``
            key, _, value = line.strip().partition(":")
            if key == "url":
                self.urls.append(value.strip().rstrip(",").strip("'\""))


def references(html: str, page_url: str) -> list[str]:
    parser = _References()
    parser.feed(html)
    return [urljoin(page_url, url) for url in parser.urls]


def outside_hosts(html: str, base_url: str) -> list[str]:
    """Every ``http(s)://`` address in the page that is not the service's own."""
    found = []
    for scheme in ("http://", "https://"):
        start = html.find(scheme)
        while start != -1:
            end = min((i for i in (html.find(c, start) for c in "'\" )>\n") if i != -1), default=len(html))
            url = html[start:end]
            if urlsplit(url).netloc != urlsplit(base_url).netloc:
                found.append(url)
            start = html.find(scheme, end)
    return found


def content_type_fits(url: str, content_type: str) -> bool:
    path = urlsplit(url).path
    suffix = Path(path).suffix or ".json"  # /openapi.json has one; nothing else here goes without
    return content_type.split(";")[0].strip() in CONTENT_TYPES.get(suffix, ())


def settings(tmp_path: Path) -> Settings:
    return Settings(
        api_token=API_TOKEN,
        database_url=f"sqlite:///{tmp_path / 'calls.db'}",
        realtime_url="ws://127.0.0.1:9/v1/realtime",
        public_url=BASE_URL,
        _env_file=None,
    )


@asynccontextmanager
async def client(tmp_path: Path, *, lifespan: bool = False) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process; with ``lifespan``, its store and services too (the REST API needs them)."""
    app = create_app(settings(tmp_path))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url=BASE_URL) as http:
        if not lifespan:
            yield http
            return
        async with app.router.lifespan_context(app):
            yield http


# ------------------------------------------------------------------------------------------------- the pages


@pytest.mark.parametrize("page", PAGES)
async def test_the_pages_load_only_their_own_assets(page: str, tmp_path: Path) -> None:
    async with client(tmp_path) as http:
        response = await http.get(page)
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/html")
        html = response.text
        assert outside_hosts(html, BASE_URL) == []
        urls = references(html, f"{BASE_URL}{page}")
        assert len(urls) >= 3, urls  # a script, an icon, the OpenAPI document (and Swagger UI's style sheet)
        for url in urls:
            assert urlsplit(url).netloc == urlsplit(BASE_URL).netloc, url
            asset = await http.get(url)
            assert asset.status_code == 200, url
            assert content_type_fits(url, asset.headers["content-type"]), (url, asset.headers["content-type"])
            assert asset.content, url


async def test_swagger_ui_asks_no_online_validator(tmp_path: Path) -> None:
    """Swagger UI's default is a badge image from the online validator: an outside request, made by the script."""
    async with client(tmp_path) as http:
        html = (await http.get("/docs")).text
    assert '"validatorUrl": null' in html


def test_the_outside_host_check_sees_a_cdn() -> None:
    html = '<script src="https://cdn.example/swagger-ui-bundle.js"></script><link href="http://callbridge.test/a">'
    assert outside_hosts(html, BASE_URL) == ["https://cdn.example/swagger-ui-bundle.js"]
    assert references(html, f"{BASE_URL}/docs") == ["https://cdn.example/swagger-ui-bundle.js", f"{BASE_URL}/a"]


# ---------------------------------------------------------------------------------------------- the schema


def operations(spec: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def resolve(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    if ref is None:
        return schema
    found: dict[str, Any] = spec
    for part in ref.removeprefix("#/").split("/"):
        found = found[part]
    return found


async def openapi(tmp_path: Path) -> dict[str, Any]:
    async with client(tmp_path) as http:
        spec: dict[str, Any] = (await http.get("/openapi.json")).json()
    return spec


async def test_every_api_operation_documents_its_error_answers(tmp_path: Path) -> None:
    spec = await openapi(tmp_path)
    api = [(method, path, operation) for method, path, operation in operations(spec) if path.startswith("/api/")]
    assert len(api) == 25
    for method, path, operation in api:
        responses = operation["responses"]
        one = ("{call_sid}", "{delivery_id}", "{campaign_id}", "{number}")
        expected = {"401", "413", "422"} | ({"404"} if any(name in path for name in one) else set())
        assert expected <= set(responses), (method, path, sorted(responses))
        for status in expected - {"413"}:
            schema = resolve(spec, responses[status]["content"]["application/json"]["schema"])
            assert "detail" in schema["properties"] and schema["required"] == ["detail"], (method, path, status)
            assert responses[status]["description"], (method, path, status)
        too_large = responses["413"]["content"]["text/plain"]["schema"]  # the body-size limit answers in text
        assert too_large["type"] == "string"
        assert "WWW-Authenticate" in responses["401"]["headers"]


async def test_every_parameter_and_field_is_described(tmp_path: Path) -> None:
    spec = await openapi(tmp_path)
    parameters = [
        (method, path, parameter["name"])
        for method, path, operation in operations(spec)
        for parameter in operation.get("parameters", [])
        if not parameter.get("description")
    ]
    assert parameters == []
    schemas = spec["components"]["schemas"]
    assert {"CallRecord", "CallPage", "CallEvent", "TranscriptLine", "ErrorBody", "ValidationErrorBody"} <= set(schemas)
    fields = [
        f"{name}.{field}"
        for name, schema in schemas.items()
        for field, prop in schema.get("properties", {}).items()
        if not prop.get("description")
    ]
    assert fields == []
    assert [name for name, schema in schemas.items() if not schema.get("description")] == []


@pytest.mark.parametrize(
    ("answer", "record"),
    [
        (rest.CallRecord, repository.CallRecord),
        (rest.CallPage, repository.CallPage),
        (rest.CallEvent, repository.CallEvent),
        (rest.TranscriptLine, transcript.TranscriptLine),
        (webhooks.WebhookDelivery, repository.OutboxEntry),
        (webhooks.WebhookDeliveryPage, repository.OutboxPage),
    ],
)
def test_each_answer_carries_every_field_of_its_record(answer: type[BaseModel], record: type[Any]) -> None:
    """The API's models are the records' fields with descriptions: a field added to a record is added here too."""
    assert list(answer.model_fields) == [field.name for field in dataclasses.fields(record)]


async def test_the_error_answers_have_the_documented_bodies(tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {API_TOKEN}"}
    async with client(tmp_path, lifespan=True) as http:
        unauthorized = await http.get("/api/calls")
        assert unauthorized.status_code == 401
        ErrorBody.model_validate(unauthorized.json())

        unknown = await http.get("/api/calls/CA" + "0" * 32, headers=headers)
        assert unknown.status_code == 404
        assert ErrorBody.model_validate(unknown.json()).detail == "no such call"

        invalid = await http.post("/api/calls", json={"to": "12"}, headers=headers)
        assert invalid.status_code == 422
        assert isinstance(ValidationErrorBody.model_validate(invalid.json()).detail, list)

        bad_cursor = await http.get("/api/calls", params={"cursor": "nope"}, headers=headers)
        assert bad_cursor.status_code == 422
        assert isinstance(ValidationErrorBody.model_validate(bad_cursor.json()).detail, str)

        unconfigured = await http.post(f"/api/calls/CA{'0' * 32}/agent", json={}, headers=headers)
        assert unconfigured.status_code == 503
        ErrorBody.model_validate(unconfigured.json())

        too_large = await http.post("/api/calls", content=b"x" * (2 * 1024 * 1024), headers=headers)
        assert too_large.status_code == 413
        assert too_large.headers["content-type"].startswith("text/plain")

        ready = await http.get("/readyz")
        assert ready.json() == {"ready": True, "active_calls": 0, "max_calls": 200}


# ------------------------------------------------------------------------------- with the network down


def _loopback_up() -> None:
    """``ip link set lo up``, without iproute2: a fresh network namespace has its loopback down."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sh", b"lo", 0)
        flags = struct.unpack("16sh", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _unreachable(host: str = "192.0.2.1", port: int = 80) -> str:
    """Why a connection to an outside address fails (it must: the namespace has no network but the loopback)."""
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return ""


def _wait_for(url: str, process: subprocess.Popen[bytes], http: httpx.Client, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"callbridge serve exited: {log.read_text()}")
        try:
            if http.get(url).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"callbridge serve did not start: {log.read_text()}")


def _fetch_pages(base_url: str, http: httpx.Client) -> dict[str, Any]:
    """Each page, then every asset it references: status, content type, size; and the outside hosts it names."""
    fetched: dict[str, Any] = {}
    for page in PAGES:
        response = http.get(f"{base_url}{page}")
        fetched[page] = {
            "status": response.status_code,
            "content_type": response.headers.get("content-type", ""),
            "outside": outside_hosts(response.text, base_url),
            "assets": {},
        }
        for url in references(response.text, f"{base_url}{page}"):
            asset = http.get(url)
            fetched[page]["assets"][url] = {
                "status": asset.status_code,
                "content_type": asset.headers.get("content-type", ""),
                "bytes": len(asset.content),
            }
    return fetched


def _render(browser: str, url: str, folder: Path) -> str:
    """The page's DOM once its scripts have run (headless Chromium, ten seconds of virtual time)."""
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={folder / 'browser'}"]
    command += ["--virtual-time-budget=10000", "--dump-dom", url]
    return subprocess.run(command, capture_output=True, check=False, timeout=90).stdout.decode()


def _rendered(browser: str, base_url: str, http: httpx.Client, folder: Path) -> dict[str, Any]:
    """What each page drew of the API: Swagger UI's paths and ReDoc's operations, against what the schema has."""
    spec = http.get(f"{base_url}/openapi.json").json()
    docs, redoc = (_render(browser, f"{base_url}{page}", folder) for page in PAGES)
    return {
        "paths": sorted(spec["paths"]),
        "swagger_ui": sorted(path for path in spec["paths"] if f'data-path="{path}"' in docs),
        "operations": sorted(op["operationId"] for _, _, op in operations(spec)),
        "redoc": sorted(
            op["operationId"] for _, _, op in operations(spec) if f'operation/{op["operationId"]}"' in redoc
        ),
    }


def in_the_namespace(folder: Path, browser: str | None = None) -> dict[str, Any]:
    """Inside ``unshare -rn``: the loopback up, ``callbridge serve`` on it, the pages and assets fetched (and with
    ``browser``, rendered)."""
    _loopback_up()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    environment = {
        **os.environ,
        "CALLBRIDGE_DATABASE_URL": f"sqlite:///{folder / 'calls.db'}",
        "CALLBRIDGE_PUBLIC_URL": base_url,
        "CALLBRIDGE_REALTIME_URL": "ws://127.0.0.1:9/v1/realtime",  # not the local engine: nothing but docs here
        "CALLBRIDGE_LOG_LEVEL": "warning",
    }
    log = folder / "serve.log"
    callbridge = Path(sys.executable).with_name("callbridge")
    with log.open("wb") as output:
        process = subprocess.Popen(
            [str(callbridge), "serve", "--port", str(port)], env=environment, cwd=folder, stdout=output, stderr=output
        )
    try:
        with httpx.Client(trust_env=False, timeout=10) as http:
            _wait_for(f"{base_url}/healthz", process, http, log)
            result = {"unreachable": _unreachable(), "pages": _fetch_pages(base_url, http)}
            if browser is not None:
                result["rendered"] = _rendered(browser, base_url, http, folder)
            return result
    finally:
        process.terminate()
        process.wait(20)


def _namespaces() -> bool:
    """Whether this user may make a user and network namespace of its own."""
    unshare = shutil.which("unshare")
    return unshare is not None and subprocess.run([unshare, "-rn", "true"], check=False).returncode == 0


def offline(folder: Path, *browser: str) -> dict[str, Any]:
    """This module as a script in a network namespace of its own: what it fetched (and rendered) there."""
    assert _namespaces(), "unshare -rn is not permitted here: this test needs user and network namespaces"
    result = subprocess.run(
        ["unshare", "-rn", sys.executable, __file__, str(folder), *browser],
        capture_output=True,
        check=False,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr.decode()
    found: dict[str, Any] = json.loads(result.stdout)
    assert found["unreachable"], "an outside address was reachable: the network is not down"
    return found


@pytest.mark.e2e
def test_docs_load_with_the_network_down(tmp_path: Path) -> None:
    """``callbridge serve`` and its client in a network namespace whose only interface is the loopback: both pages
    and every asset they reference load."""
    fetched = offline(tmp_path)
    assert fetched["unreachable"], "an outside address was reachable: the network is not down"
    for page in PAGES:
        seen = fetched["pages"][page]
        assert seen["status"] == 200 and seen["content_type"].startswith("text/html"), (page, seen)
        assert seen["outside"] == [], (page, seen)
        assert len(seen["assets"]) >= 3, (page, seen)
        for url, asset in seen["assets"].items():
            assert asset["status"] == 200 and asset["bytes"] > 0, (url, asset)
            assert content_type_fits(url, asset["content_type"]), (url, asset)
    swagger = {Path(urlsplit(url).path).name for url in fetched["pages"]["/docs"]["assets"]}
    assert {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png", "openapi.json"} <= swagger


@pytest.mark.e2e
@pytest.mark.slow
def test_docs_render_in_a_browser_with_the_network_down(tmp_path: Path) -> None:
    """Headless Chromium in the same kind of namespace: Swagger UI draws every path, ReDoc every operation."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    assert browser is not None, "no Chromium: `make install-test` installs Debian's chromium package"
    rendered = offline(tmp_path, browser)["rendered"]
    assert len(rendered["operations"]) >= 10  # 7 of the REST API, 3 of health and metrics
    assert rendered["swagger_ui"] == rendered["paths"]
    assert rendered["redoc"] == rendered["operations"]


if __name__ == "__main__":
    print(json.dumps(in_the_namespace(Path(sys.argv[1]), *sys.argv[2:3])))
