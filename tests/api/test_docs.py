"""/docs and /redoc render with the network blocked (assets come from the package), the lock
icons follow the API keys, and /metrics names the docs routes.

The pages are loaded by headless Chromium against a real server, with every host but
127.0.0.1 unreachable; a control shows that the same page with its scripts on any other
host (a stand-in CDN on 127.0.0.2, the real CDN) renders nothing under that block.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import httpx
import pytest

from helpers import REPO, ServerProcess, free_port
from service.api.docs import STATIC_DIR

# Unknown host names fail to resolve and everything not for 127.0.0.1 goes to a dead proxy
# (`<-loopback>` drops Chromium's implicit proxy bypass for the rest of 127.0.0.0/8).
OFFLINE = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
           "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>;127.0.0.1"]


def chromium_dom(url: str, tmp_path: Path, offline: bool = True) -> str:
    """The DOM after scripts ran (virtual time: no waiting on the wall clock)."""
    exe = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                if Path(p).exists()), None)
    if exe is None:
        pytest.fail("chromium not installed: `make tools` (apt-get install chromium)")
    profile = tmp_path / f"chromium-{len(list(tmp_path.glob('chromium-*')))}"
    r = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={profile}", *(OFFLINE if offline else []),
                        "--virtual-time-budget=15000", "--dump-dom", url],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def swagger_paths(dom: str) -> set[str]:
    """Paths of the operation blocks Swagger UI rendered."""
    blocks = re.findall(r'<div class="opblock opblock-\w+[^"]*".*?data-path="([^"]+)"', dom,
                        flags=re.S)
    return set(blocks)


def operation_id(spec: dict, path: str, method: str) -> str:
    return spec["paths"][path][method]["operationId"]


def test_swagger_ui_renders_offline(api_server, tmp_path):
    page = httpx.get(f"{api_server.url}/docs").text
    # every asset the page names is on this server
    assert not re.findall(r'(?:src|href)="(?!/)[^"]*"', page), page
    dom = chromium_dom(f"{api_server.url}/docs", tmp_path)
    assert {"/attack", "/encode", "/audit", "/audit/{audit_id}", "/models"} <= swagger_paths(dom)
    assert "POST /audit" in dom  # the intro names the batch audits
    # no API keys on this server: no lock icons, no Authorize button
    assert "authorization__btn" not in dom and "btn authorize" not in dom


def test_redoc_renders_offline(api_server, tmp_path):
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    page = httpx.get(f"{api_server.url}/redoc").text
    assert not re.findall(r'(?:src|href)="(?!/)[^"]*"', page), page
    dom = chromium_dom(f"{api_server.url}/redoc", tmp_path)
    for path, method in (("/attack", "post"), ("/audit", "post"), ("/audit/{audit_id}", "get")):
        assert f'data-section-id="operation/{operation_id(spec, path, method)}"' in dom, path


def control_page(spec: dict, asset_base: str) -> str:
    """Swagger UI with the spec inline and its script and stylesheet under ``asset_base``."""
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8">'
            f'<link rel="stylesheet" href="{asset_base}/swagger-ui.css"></head><body>'
            f'<div id="swagger-ui"></div><script src="{asset_base}/swagger-ui-bundle.js"></script>'
            f"<script>SwaggerUIBundle({{spec: {json.dumps(spec)}, dom_id: '#swagger-ui'}})"
            f"</script></body></html>")


@pytest.fixture()
def other_host():
    """The vendored assets served from 127.0.0.2: reachable, but not the server's host."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=STATIC_DIR)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.2", free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.2:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_the_block_stops_every_other_host(api_server, other_host, tmp_path):
    """The checks above would pass vacuously if the block let a CDN through: a page whose
    assets are on another host renders only without the block."""
    spec = httpx.get(f"{api_server.url}/openapi.json").json()
    local = tmp_path / "other_host.html"
    local.write_text(control_page(spec, f"{other_host}/swagger-ui"))
    assert "/attack" in swagger_paths(chromium_dom(local.as_uri(), tmp_path, offline=False))
    assert swagger_paths(chromium_dom(local.as_uri(), tmp_path)) == set()
    cdn = tmp_path / "cdn.html"
    cdn.write_text(control_page(spec, "https://cdn.jsdelivr.net/npm/swagger-ui-dist@5"))
    assert swagger_paths(chromium_dom(cdn.as_uri(), tmp_path)) == set()


@pytest.fixture(scope="module")
def keyed_docs_server(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("keyed-docs") / "server.log"
    with ServerProcess(tiny_store, log, env={"HASHAUDIT_API_KEYS": "k1"}) as server:
        yield server


def test_security_schemes_only_with_api_keys(api_server, keyed_docs_server, tmp_path):
    open_spec = httpx.get(f"{api_server.url}/openapi.json").json()
    assert "securitySchemes" not in open_spec.get("components", {})
    assert not [op for ops in open_spec["paths"].values() for op in ops.values()
                if "security" in op]

    url = keyed_docs_server.url
    # the pages, the schema and the assets need no key; the API does
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                 "/static/swagger-ui/swagger-ui-bundle.js", "/static/redoc/redoc.standalone.js"):
        assert httpx.get(url + path).status_code == 200, path
    assert httpx.get(f"{url}/models").status_code == 401
    spec = httpx.get(f"{url}/openapi.json").json()
    assert {"APIKeyHeader", "HTTPBearer"} <= set(spec["components"]["securitySchemes"])
    assert spec["paths"]["/attack"]["post"]["security"]
    assert "security" not in spec["paths"]["/health/live"]["get"]
    dom = chromium_dom(f"{url}/docs", tmp_path)
    assert '<button class="btn authorize' in dom
    secured = sum("security" in op for ops in spec["paths"].values() for op in ops.values())
    assert secured >= 10 and dom.count('<button class="authorization__btn') == secured


def test_oauth2_redirect_page(api_server):
    r = httpx.get(f"{api_server.url}/docs/oauth2-redirect")
    assert r.status_code == 200 and "swaggerUIRedirectOauth2" in r.text
    assert "oauth2RedirectUrl: window.location.origin + '/docs/oauth2-redirect'" in \
        httpx.get(f"{api_server.url}/docs").text


def route_counts(text: str) -> dict[tuple[str, str], float]:
    """{(route, status): count} of GET requests in /metrics."""
    out: dict[tuple[str, str], float] = {}
    for route, status, value in re.findall(
            r'hashaudit_requests_total\{method="GET",route="([^"]*)",status="(\d+)"\} (\S+)',
            text):
        out[(route, status)] = float(value)
    return out


def test_metrics_label_docs_schema_and_assets_by_route(api_server):
    url = api_server.url
    before = route_counts(httpx.get(f"{url}/metrics").text)
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                 "/static/swagger-ui/swagger-ui.css", "/static/redoc/redoc.standalone.js",
                 "/static/no-such-asset.js", "/no/such/route-7", "/no/such/route-8"):
        httpx.get(url + path)
    after = route_counts(httpx.get(f"{url}/metrics").text)

    def grew(route: str, status: str) -> float:
        return after.get((route, status), 0) - before.get((route, status), 0)

    for route in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        assert grew(route, "200") == 1, route
    assert grew("/static/{path}", "200") == 2  # one label for every asset
    assert grew("/static/{path}", "404") == 1
    assert grew("unmatched", "404") == 2
    # bounded: the labels are the app's route templates plus `unmatched`
    spec_paths = set(httpx.get(f"{url}/openapi.json").json()["paths"])
    known = spec_paths | {"/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect",
                          "/static/{path}", "unmatched"}
    assert {route for route, _ in after} <= known


def test_wheel_ships_the_docs_assets(tmp_path):
    """`pip install .` (the Docker image) must carry the assets, or /docs is blank again."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "service", src / "service",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist"), str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("hashaudit-*.whl")
    shipped = set(zipfile.ZipFile(wheel).namelist())
    assets = {f"service/api/{p.relative_to(STATIC_DIR.parent).as_posix()}"
              for p in STATIC_DIR.rglob("*") if p.is_file()}
    assert assets and assets <= shipped, sorted(assets - shipped)
