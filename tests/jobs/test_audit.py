"""Audits end to end: real API server, real worker processes, real Redis (own DB index),
the tiny real bundle; results compared with `hashaudit audit run` for the same seed."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from html import escape as html_escape
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import (
    REPO,
    audit_stack,
    check_renders_in_chromium,
    start_worker,
    stop_process,
    submit,
    wait,
)

SPEC = {"methods": ["untargeted_gan", "pgd", "dhta_targeted"], "eps": ["8/255", "16/255"],
        "queries": {"count": 60}, "seed": 3, "chunk_size": 20, "batch_size": 10}

TIMING = {"seconds", "ms_per_image", "audit_id"}


@pytest.fixture(scope="module")
def stack(tiny_store: Path, redis_db, tmp_path_factory: pytest.TempPathFactory):
    """API server with Redis audits; tests start and kill workers themselves."""
    with audit_stack(tiny_store, tmp_path_factory.mktemp("audit_logs")) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_store: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`hashaudit audit run` of SPEC (a subprocess, same thread settings as the workers)."""
    out = tmp_path_factory.mktemp("cli_audit")
    cmd = [sys.executable, "-m", "service.cli", "audit", "run", "--bundle", "tiny",
           "--store", str(tiny_store), "--methods", *SPEC["methods"], "--eps", *SPEC["eps"],
           "--count", str(SPEC["queries"]["count"]), "--seed", str(SPEC["seed"]),
           "--chunk-size", str(SPEC["chunk_size"]), "--batch-size", str(SPEC["batch_size"]),
           "--device", "cpu", "--no-progress", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HASHAUDIT_REDIS_URL", None)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (out / "report.html").stat().st_size > 10_000
    return json.loads((out / "report.json").read_text())


def strip(result: dict) -> dict:
    """The result without timings (which differ run to run)."""
    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in TIMING}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(result)


SPEC_HTTP = {**SPEC, "model": "tiny"}


def test_audit_through_redis_worker_equals_cli(stack, reference, tmp_path):
    worker = start_worker(stack.worker_env, stack.logs / "w-e2e.log", "w-e2e")
    try:
        audit_id = submit(stack.url, SPEC_HTTP)
        st = wait(stack.url, audit_id)
    finally:
        stop_process(worker)
    assert st["state"] == "done", st
    p = st["progress"]
    assert p["done_images"] == p["total_images"] == 60 * 3 * 2
    assert p["done_chunks"] == p["total_chunks"] == 3 * 3 * 2
    assert strip(st["result"]) == strip(reference)
    res = st["result"]
    assert res["bundle_sha"] and res["package_version"] and res["seed"] == 3
    targeted = [a for a in res["attacks"] if a["method"] == "dhta_targeted"]
    assert all(a["t_map"] > a["t_map_clean"] for a in targeted)
    pgd = [a for a in res["attacks"] if a["method"] == "pgd"]
    assert all(a["map_k"] < res["clean"]["map_k"] for a in pgd)
    listed = httpx.get(f"{stack.url}/audit").json()["audits"]
    assert audit_id in [a["id"] for a in listed]
    rep = httpx.get(f"{stack.url}/audit/{audit_id}/report")
    assert rep.json() == res
    html = httpx.get(f"{stack.url}/audit/{audit_id}/report",
                     headers={"Accept": "text/html"}, timeout=60)
    assert html.headers["content-type"].startswith("text/html")
    assert_report_page(html.text, res)
    assert 'data-plot="map_vs_eps"' in html.text  # two eps values: a line over eps
    # the JSON link, resolved against the page's own URL as a browser would
    href = re.search(r"id='json-link' href='([^']+)'", html.text).group(1)
    assert httpx.get(str(html.url.join(href))).json() == res
    check_renders_in_chromium(html.text, tmp_path)


def assert_report_page(page: str, res: dict) -> None:
    """The verdict names the worst attack (lowest attacked mAP@all) and its eps, says how
    the query set relates to the bundle's split and compares clean mAP with the recorded
    figure; both clean and attacked columns for each figure; the glossary."""
    verdict = re.search(r"<p class='verdict' id='verdict'>(.*?)</p>", page).group(1)
    worst = min(res["attacks"], key=lambda a: a["map_all"])
    assert f"Worst attack: <b>{worst['method']} at eps {worst['eps_levels']}/255</b>" in verdict
    assert f"to <b>{worst['map_all']:.4f}</b>" in verdict
    q = res["queries"]
    assert res["bundle_query_split"] == 100  # the tiny bundle's query split
    if q["source"] == "bundle" and q["audited"] < 100:
        assert f"random subsample: {q['audited']} of the bundle's 100 query images" in verdict
    rec = res["bundle_recorded"]["map_all"]
    assert f"the bundle records {rec:.4f}" in verdict
    assert f"{res['clean']['map_all'] - rec:+.4f}" in verdict
    table = page[page.index("<table id='figures'>"):]
    table = table[:table.index("</table>")]
    for label in ("mAP@all", "mAP@1000", "P@r≤2"):
        assert f"<th class='grp' colspan='2'>{label}</th>" in table
    assert table.count("<th>clean</th><th>attacked</th>") >= 3
    for a in res["attacks"]:
        for key in ("map_all", "map_1000", "p_r2"):
            assert (f"<td>{res['clean'][key]:.4f}</td><td class='att'>{a[key]:.4f}</td>"
                    in table)
    assert "<h2 id='glossary'>Glossary</h2>" in page
    for term in ("codes changed %", "perturbation (stretched)", "mAP@all, mAP@1000 (mAP@K)",
                 "P@r≤2", "t-MAP"):
        assert f"<dt>{html_escape(term)}</dt>" in page


def test_cli_report_with_one_eps_draws_bars_and_links_its_json(tiny_store, tmp_path):
    """`hashaudit audit run` with a single eps: the mAP plot is a bar per method (no line from
    eps 0), the page links report.json written beside it, and it renders offline."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "service.cli", "audit", "run", "--bundle", "tiny", "--store",
           str(tiny_store), "--methods", "uaa_gan", "pgd", "--eps", "8/255", "--count", "20",
           "--device", "cpu", "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    page = (out / "report.html").read_text()
    res = json.loads((out / "report.json").read_text())
    assert 'data-plot="map_by_method"' in page and 'data-plot="map_vs_eps"' not in page
    assert "id='json-link' href='report.json'" in page
    assert_report_page(page, res)
    assert "random subsample: 20 of the bundle's 100" in page
    assert "<label class='zoom'><input type='checkbox'><img" in page  # enlarge on click
    check_renders_in_chromium(page, tmp_path)


def test_worker_killed_mid_audit_is_recovered(stack, reference, redis_db):
    """SIGKILL the only worker while a chunk runs; a new worker finishes the audit; every
    chunk counts exactly once and the result equals the uninterrupted one. The lost chunk is
    retried at the front of the queue: it starts before every chunk that was still queued
    behind it when its worker died."""
    from rq import Queue
    from rq.job import Job
    from rq.registry import StartedJobRegistry
    from rq.serializers import JSONSerializer

    a = start_worker(stack.worker_env, stack.logs / "w-crash-a.log", "w-crash-a")
    b = None
    try:
        audit_id = submit(stack.url, SPEC_HTTP)
        # cleanup=False: reading the registry must not itself retry abandoned jobs
        reg = StartedJobRegistry("hashaudit", connection=redis_db, serializer=JSONSerializer)
        queue = Queue("hashaudit", connection=redis_db, serializer=JSONSerializer)
        deadline = time.monotonic() + 120
        killed_job = None
        while time.monotonic() < deadline:
            st = httpx.get(f"{stack.url}/audit/{audit_id}").json()
            running = [j for j in reg.get_job_ids(cleanup=False) if audit_id in j]
            if st["progress"]["done_chunks"] >= 2 and running:
                killed_job = running[0]
                os.kill(a.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        assert killed_job, "worker finished before it could be killed"
        a.wait(10)
        # The job listed before the kill may have finished in the meantime: the chunk the
        # worker died in is the one its registry still holds now that it is dead.
        held = [j for j in reg.get_job_ids(cleanup=False) if audit_id in j]
        assert len(held) == 1, f"the dead worker held {held}"
        killed_job = held[0]
        queued_behind = [j for j in queue.get_job_ids() if audit_id in j]
        assert queued_behind, "no chunk left queued behind the killed one"
        done_before = httpx.get(f"{stack.url}/audit/{audit_id}").json()["progress"]
        assert done_before["done_chunks"] < done_before["total_chunks"]
        # the dead worker's lease (3 heartbeats) lapses before the new worker looks for it
        while killed_job not in reg.get_expired_job_ids(time.time()):
            assert time.monotonic() < deadline, "the killed job's lease never lapsed"
            time.sleep(0.05)
        b = start_worker(stack.worker_env, stack.logs / "w-crash-b.log", "w-crash-b")
        st = wait(stack.url, audit_id)
    finally:
        stop_process(a)
        stop_process(b)
    assert st["state"] == "done", st
    assert st["progress"]["done_chunks"] == st["progress"]["total_chunks"] == 18
    assert st["progress"]["done_images"] == st["progress"]["total_images"]
    assert strip(st["result"]) == strip(reference)
    job = Job.fetch(killed_job, connection=redis_db, serializer=JSONSerializer)
    assert job.get_status() == "finished"
    assert job.retries_left == 2  # RQ found the dead worker's job and ran it again
    later = Job.fetch_many(queued_behind, connection=redis_db, serializer=JSONSerializer)
    assert all(j.get_status() == "finished" for j in later)
    first_behind = min(j.started_at for j in later)
    assert job.started_at < first_behind, (job.started_at, first_behind)


def test_cancel_drops_queued_work(stack):
    spec = {**SPEC_HTTP, "methods": ["pgd"], "eps": ["4/255", "8/255", "12/255", "16/255"],
            "queries": {"count": 100}, "chunk_size": 10, "batch_size": 2}
    worker = start_worker(stack.worker_env, stack.logs / "w-cancel.log", "w-cancel")
    try:
        audit_id = submit(stack.url, spec)
        wait(stack.url, audit_id, until=("running",))
        r = httpx.delete(f"{stack.url}/audit/{audit_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled"
        time.sleep(3)
        st = httpx.get(f"{stack.url}/audit/{audit_id}").json()
        assert st["state"] == "cancelled" and st["result"] is None
        assert st["progress"]["done_chunks"] < st["progress"]["total_chunks"] // 2
        # the worker keeps serving: a small audit after the cancel completes
        nxt = submit(stack.url, {**SPEC_HTTP, "methods": ["untargeted_gan"], "eps": "8/255",
                                 "queries": {"count": 10}})
        assert wait(stack.url, nxt)["state"] == "done"
        later = httpx.get(f"{stack.url}/audit/{audit_id}").json()["progress"]["done_chunks"]
        assert later == st["progress"]["done_chunks"]
    finally:
        stop_process(worker)


def _archive(tmp_path: Path, images: list[np.ndarray], lines: list[str], kind: str,
             corrupt: int | None = None) -> bytes:
    files = {}
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img[0]).save(buf, format="PNG")
        data = buf.getvalue()
        if i == corrupt:
            data = data[:40] + b"\x00" * 30  # a PNG header, then garbage
        files[f"imgs/q{i}.png"] = data
    files["labels.txt"] = ("\n".join(lines) + "\n").encode()
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as z:
            for n, d in files.items():
                z.writestr(n, d)
    else:
        with tarfile.open(fileobj=buf, mode="w:gz") as t:
            for n, d in files.items():
                info = tarfile.TarInfo(n)
                info.size = len(d)
                t.addfile(info, io.BytesIO(d))
    return buf.getvalue()


def _upload(url: str, data: bytes, name: str = "q.zip") -> httpx.Response:
    return httpx.post(f"{url}/audit/uploads", files={"archive": (name, data)},
                      data={"model": "tiny"}, timeout=60)


def test_uploaded_queries_and_a_corrupt_image_fails_the_audit(stack, tiny_bundle, tmp_path):
    q = tiny_bundle.queries
    imgs = [q.images[i] for i in range(12)]
    lines = [f"imgs/q{i}.png " + " ".join(str(int(v)) for v in q.labels[i]) for i in range(12)]
    worker = start_worker(stack.worker_env, stack.logs / "w-upload.log", "w-upload")
    try:
        up = _upload(stack.url, _archive(tmp_path, imgs, lines, "tar"), "q.tar.gz")
        assert up.status_code == 201, up.text
        assert up.json()["count"] == 12
        audit_id = submit(stack.url, {**SPEC_HTTP, "methods": ["pgd", "dhta_targeted"],
                                      "eps": "16/255", "queries": {"upload_id": up.json()["id"]},
                                      "chunk_size": 5})
        st = wait(stack.url, audit_id)
        assert st["state"] == "done", st
        assert st["result"]["queries"]["source"] == "upload"
        assert st["result"]["queries"]["audited"] == 12
        # targets drawn from the uploaded labels (one meta read per chunk) and attacked toward
        tgt = next(a for a in st["result"]["attacks"] if a["method"] == "dhta_targeted")
        assert tgt["t_map"] > tgt["t_map_clean"], tgt

        bad = _upload(stack.url, _archive(tmp_path, imgs, lines, "zip", corrupt=7))
        assert bad.status_code == 201, bad.text
        audit_id = submit(stack.url, {**SPEC_HTTP, "methods": ["pgd"], "eps": "8/255",
                                      "queries": {"upload_id": bad.json()["id"]},
                                      "chunk_size": 5})
        st = wait(stack.url, audit_id, timeout=60)
        assert st["state"] == "failed"
        assert "imgs/q7.png" in st["error"] and "chunk pgd|0|1" in st["error"]
    finally:
        stop_process(worker)


@pytest.mark.parametrize("case", ["not an archive", "no list", "bad label count",
                                  "missing file", "unsafe path"])
def test_bad_uploads_are_422(stack, tiny_bundle, tmp_path, case):
    q = tiny_bundle.queries
    imgs = [q.images[i] for i in range(3)]
    lines = [f"imgs/q{i}.png " + " ".join(str(int(v)) for v in q.labels[i]) for i in range(3)]
    if case == "not an archive":
        data = b"hello" * 100
    elif case == "bad label count":
        data = _archive(tmp_path, imgs, [ln + " 1" for ln in lines], "zip")
    elif case == "missing file":
        data = _archive(tmp_path, imgs, lines + ["imgs/nope.png " + lines[0].split(" ", 1)[1]],
                        "zip")
    elif case == "unsafe path":
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("../evil.png", b"x")
            z.writestr("labels.txt", b"../evil.png 1 0 0 0 0 0 0 0 0 0\n")
        data = buf.getvalue()
    else:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("a.png", b"x")
        data = buf.getvalue()
    r = _upload(stack.url, data)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "archive"


@pytest.mark.parametrize("body,field", [
    ({"methods": ["zap"]}, "methods"),
    ({"methods": []}, "methods"),
    ({"methods": ["pgd"], "eps": "1/2"}, "eps"),
    ({"methods": ["pgd"], "eps": "lots"}, "eps"),
    ({"methods": ["pgd"], "queries": {"count": 101}}, "queries.count"),
    ({"methods": ["pgd"], "queries": {"upload_id": "0000"}}, "queries.upload_id"),
    ({"methods": ["pgd"], "model": "../tiny"}, "model"),
    ({"methods": ["pgd"], "chunk_size": 0}, "chunk_size"),
    ({"methods": ["pgd"], "colour": "red"}, "colour"),
    ({"methods": ["pgd"], "transfer_to": ["nope"]}, "transfer_to"),
    ({"methods": ["pgd"], "frontier": "maybe"}, "frontier"),
    ({"type": "poison"}, "type"),
    ({"type": "backdoor"}, "backdoor"),
    ({"type": "backdoor", "backdoor": {"target": "Spaceship"}}, "backdoor.target"),
    ({"type": "backdoor", "backdoor": {"target": "Bag,Coat"}}, "backdoor.target"),
    ({"type": "backdoor", "backdoor": {"target": "Bag", "poisons": [5000]}}, "backdoor.poisons"),
    ({"type": "backdoor", "backdoor": {"target": "Bag", "poisons": [-1]}}, "backdoor.poisons"),
    ({"type": "backdoor", "backdoor": {"target": "Bag", "patch": 28}}, "backdoor.patch"),
    ({"type": "backdoor", "backdoor": {"target": "Bag", "perturb_eps": "1/2"}},
     "backdoor.perturb_eps"),
    ({"type": "backdoor", "backdoor": {"target": "Bag", "size": 3}}, "backdoor.size"),
    ({"type": "backdoor", "methods": ["pgd"], "backdoor": {"target": "Bag"}}, "methods"),
    ({"methods": ["pgd"], "backdoor": {"target": "Bag"}}, "backdoor"),
])
def test_bad_audit_requests_name_the_field(stack, body, field):
    r = httpx.post(f"{stack.url}/audit", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field, r.json()
    assert httpx.get(f"{stack.url}/audit/zzz").status_code == 404
    assert httpx.delete(f"{stack.url}/audit/0123456789abcdef").status_code == 404


def test_in_process_audits_without_redis(api_server, reference):
    """Without HASHAUDIT_REDIS_URL the server runs the same task code on a thread."""
    ready = httpx.get(f"{api_server.url}/health/ready").json()
    assert ready["detail"]["audits"]["runner"] == "in-process"
    audit_id = submit(api_server.url, SPEC_HTTP)
    st = wait(api_server.url, audit_id)
    assert st["state"] == "done", st
    # the API server runs torch with the same single thread as the CLI subprocess
    assert strip(st["result"]) == strip(reference)


def test_transfer_rows_equal_white_box_on_an_identical_copy(tiny_store, tmp_path):
    """`--transfer-to` a byte-identical copy of the surrogate: every transfer figure must equal
    the white-box one (same hasher, same gallery), through the whole chunk/reduce path."""
    import shutil

    store = tmp_path / "store"
    shutil.copytree(tiny_store / "tiny", store / "tiny")
    shutil.copytree(tiny_store / "tiny", store / "tiny-copy")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "service.cli", "audit", "run", "--bundle", "tiny", "--store",
           str(store), "--methods", "pgd", "uaa_gan", "--eps", "8/255", "16/255", "--count",
           "40", "--chunk-size", "15", "--transfer-to", "tiny-copy", "--device", "cpu",
           "--no-progress", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads((out / "report.json").read_text())
    assert res["transfer_to"] == ["tiny-copy"]
    for a in res["attacks"]:
        (t,) = a["transfer"]
        assert t["model"] == "tiny-copy"
        assert t["map_clean"] == pytest.approx(res["clean"]["map_k"], abs=1e-12)
        assert t["map_k"] == pytest.approx(a["map_k"], abs=1e-12)
    assert "Transfer" in (out / "report.html").read_text()
