"""`carsam dashboard`: writes the page and prints its path; `--serve` serves it, rebuilt per request."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest

from carsam import cli
from carsam.record import write_record
from carsam.report import dashboard
from carsam.report.dashboard import extract_embedded_data, make_server

from .helpers import make_record


def _get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.headers["Content-Type"], resp.read().decode("utf-8")


@pytest.fixture
def server(fake_runs):
    srv = make_server(fake_runs["dir"], "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


def test_serve_returns_the_page_rebuilt_on_each_request(server, fake_runs):
    host, port = server.server_address[:2]
    assert host == "127.0.0.1"
    status, ctype, page = _get(f"http://{host}:{port}/")
    assert status == 200 and ctype.startswith("text/html")
    assert [r["run_id"] for r in extract_embedded_data(page)["runs"]] == ["r1", "r2", "r3"]
    write_record(fake_runs["dir"] / "r4", make_record("r4", "late", "rtn"))
    assert [r["name"] for r in extract_embedded_data(_get(f"http://{host}:{port}/")[2])["runs"]][-1] == "late"
    with pytest.raises(urllib.error.HTTPError, match="404"):
        _get(f"http://{host}:{port}/etc/passwd")


def test_cli_writes_the_page_and_prints_its_path(fake_runs, tmp_path, capsys):
    out = tmp_path / "sub" / "dash.html"
    assert cli.main(["dashboard", "--runs", str(fake_runs["dir"]), "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert len(extract_embedded_data(out.read_text(encoding="utf-8"))["runs"]) == 3


def test_cli_serve_prints_the_url_and_serves(fake_runs, monkeypatch, capsys):
    started = []

    def recording_server(*args, **kwargs):
        started.append(make_server(*args, **kwargs))
        return started[-1]

    monkeypatch.setattr(dashboard, "make_server", recording_server)
    result = []
    thread = threading.Thread(target=lambda: result.append(
        cli.main(["dashboard", "--runs", str(fake_runs["dir"]), "--serve", "--port", "0"])), daemon=True)
    thread.start()
    for _ in range(100):
        if started:
            break
        thread.join(timeout=0.1)
    host, port = started[0].server_address[:2]
    try:
        assert extract_embedded_data(_get(f"http://{host}:{port}/")[2])["runs"][0]["run_id"] == "r1"
    finally:
        started[0].shutdown()
        thread.join(timeout=10)
    assert result == [0] and f"http://127.0.0.1:{port}/" in capsys.readouterr().out


def test_cli_out_and_serve_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["dashboard", "--runs", str(tmp_path), "--out", "x.html", "--serve"])
