"""The data resolver (`distill.data.paths`): the order of the places it looks in, its one-line refusal, the
download fallback (never the network here: `fetch_url` is replaced) and its checksum check; and the test
helpers that skip on missing data, which CI (DISTILL_REQUIRE_DATA=1) turns into failures."""

from __future__ import annotations

import gzip
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_helpers import require_data
from distill.data import build_data, paths
from distill.data.paths import SHARED_FILES, Source, data_path, data_root, find_data
from distill.errors import UserError

TESTS = Path(__file__).resolve().parent
TEXT = "text/example.txt"


@pytest.fixture
def places(monkeypatch, tmp_path) -> dict[str, Path]:
    """Three empty places: `$DISTILL_DATA`, a stand-in ../shared/data, and the download cache; downloads
    off, and any use of the network an error."""
    folders = {"env": tmp_path / "env", "shared": tmp_path / "shared" / "data"}
    monkeypatch.setenv("DISTILL_DATA", str(folders["env"]))
    monkeypatch.delenv("DISTILL_SHARED_DATA", raising=False)
    monkeypatch.delenv("DISTILL_DOWNLOAD", raising=False)
    monkeypatch.setenv("DISTILL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(paths, "shared_candidates", lambda: [folders["shared"]])
    monkeypatch.setattr(paths, "fetch_url", _no_network)
    folders["cache"] = paths.cache_dir()
    return folders


def _no_network(url: str) -> bytes:
    raise AssertionError(f"a test tried to download {url}")


def _put(folder: Path, relative: str, data: bytes = b"text") -> Path:
    path = folder / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _offer(monkeypatch, relative: str, content: bytes, **source) -> list[str]:
    """Make `relative` downloadable with the checksum of `content`; returns the list of URLs fetched."""
    digest = hashlib.sha256(source.pop("shared", content)).hexdigest()
    url = f"https://example.invalid/{relative}"
    monkeypatch.setitem(SHARED_FILES, relative, Source(url, digest, **source))
    fetched: list[str] = []
    monkeypatch.setattr(paths, "fetch_url", lambda url: fetched.append(url) or content)
    return fetched


# ------------------------------------------------------------------------------------------------ order


def test_places_are_searched_in_order(places):
    for name in ("cache", "shared", "env"):  # the last one written is the first place looked in
        _put(places[name], TEXT, name.encode())
    for name in ("env", "shared", "cache"):
        found = data_path(TEXT)
        assert found == places[name] / TEXT and found.read_bytes() == name.encode()
        found.unlink()
    with pytest.raises(UserError) as error:
        data_path(TEXT)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"data: {TEXT} not found in ")
    labels = {"env": "$DISTILL_DATA", "shared": "../shared/data", "cache": "the download cache"}
    for name, label in labels.items():
        assert f"{label} ({places[name]})" in message
    assert "set DISTILL_DATA" in message


def test_a_folder_counts_only_where_all_its_files_are(places, monkeypatch):
    names = ("images/digits_x/a.gz", "images/digits_x/b.gz")
    for name in names:
        monkeypatch.setitem(SHARED_FILES, name, Source(None, "0" * 64, hint="copy it by hand"))
    _put(places["env"], names[0])  # incomplete: passed over
    for name in names:
        _put(places["shared"], name)
    assert data_path("images/digits_x") == places["shared"] / "images/digits_x"
    assert find_data("images/digits_x/a.gz") == places["env"] / names[0]  # one file alone is complete
    (places["shared"] / names[1]).unlink()
    with pytest.raises(UserError, match="images/digits_x not found in .*copy it by hand"):
        data_path("images/digits_x")


def test_unset_data_env_and_the_deprecated_alias(places, monkeypatch, tmp_path):
    monkeypatch.delenv("DISTILL_DATA")
    with pytest.raises(UserError, match=r"\$DISTILL_DATA \(not set\)"):
        data_path(TEXT)
    old = _put(tmp_path / "old", TEXT)
    monkeypatch.setenv("DISTILL_SHARED_DATA", str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match="DISTILL_SHARED_DATA is deprecated"):
        assert data_path(TEXT) == old
    monkeypatch.setenv("DISTILL_DATA", str(places["env"]))  # the new name wins: the old one is not looked at
    with pytest.raises(UserError):
        data_path(TEXT)


def test_data_root_is_the_first_folder_that_exists(places):
    assert data_root() == places["cache"]
    places["shared"].mkdir(parents=True)
    assert data_root() == places["shared"]
    places["env"].mkdir()
    assert data_root() == places["env"]


# --------------------------------------------------------------------------------------------- download


def test_download_only_when_asked_then_found_in_the_cache(places, monkeypatch):
    fetched = _offer(monkeypatch, TEXT, b"hello\n")
    with pytest.raises(UserError, match="DISTILL_DOWNLOAD=1"):
        data_path(TEXT)
    assert fetched == []
    monkeypatch.setenv("DISTILL_DOWNLOAD", "1")
    with pytest.raises(UserError):
        data_path(TEXT, download=False)  # an explicit no wins over the environment
    assert data_path(TEXT) == places["cache"] / TEXT
    assert (places["cache"] / TEXT).read_bytes() == b"hello\n" and len(fetched) == 1
    monkeypatch.delenv("DISTILL_DOWNLOAD")
    assert data_path(TEXT) == places["cache"] / TEXT and len(fetched) == 1  # no second download


def test_a_download_with_the_wrong_checksum_is_refused_and_not_written(places, monkeypatch):
    _offer(monkeypatch, TEXT, b"tampered\n", shared=b"hello\n")
    with pytest.raises(UserError) as error:
        data_path(TEXT, download=True)
    message = str(error.value)
    assert "\n" not in message and "SHA256" in message and TEXT in message and "not written" in message
    target = places["cache"] / TEXT
    assert not target.exists() and not list(target.parent.glob("*"))  # no temporary file either


def test_a_download_drops_the_header_lines_the_shared_copy_lacks(places, monkeypatch):
    _offer(monkeypatch, TEXT, b"label\ttext\nham\thi\n", shared=b"ham\thi\n", drop_lines=1)
    assert data_path(TEXT, download=True).read_bytes() == b"ham\thi\n"


def test_a_file_without_public_copy_says_what_to_do(places, monkeypatch):
    monkeypatch.setitem(SHARED_FILES, TEXT, Source(None, "0" * 64, hint="build it with make_example"))
    with pytest.raises(UserError, match="make_example"):
        data_path(TEXT, download=True)
    with pytest.raises(UserError, match="not found in .*make_example"):
        data_path(TEXT)


def test_a_failed_transfer_is_one_line(places, monkeypatch):
    def refuse(url: str) -> bytes:
        raise OSError("network is unreachable")

    _offer(monkeypatch, TEXT, b"x")
    monkeypatch.setattr(paths, "fetch_url", refuse)
    with pytest.raises(UserError, match="cannot download https://example.invalid/text/example.txt: network"):
        data_path(TEXT, download=True)


def test_the_table_is_the_shared_manifest():
    manifest = require_data("images").parent / "MANIFEST.sha256"
    listed = {}
    for line in manifest.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    assert listed == {name: source.sha256 for name, source in SHARED_FILES.items()}
    for source in SHARED_FILES.values():
        assert (
            source.hint if source.url is None else source.url.startswith("https://raw.githubusercontent.com/")
        )


# ------------------------------------------------------------------------------------------------ loaders


def _idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_loaders_read_through_the_resolver(places):
    mnist = places["env"] / "images" / "mnist_t10k"
    rng = np.random.default_rng(0)
    _idx(mnist / "t10k-images-idx3-ubyte.gz", rng.integers(0, 256, (40, 28, 28)))
    _idx(mnist / "t10k-labels-idx1-ubyte.gz", np.arange(40) % 10)
    splits = build_data("mnist")
    assert str(mnist) in splits.description and len(splits.train) + len(splits.test) == 40
    with pytest.raises(UserError) as error:
        build_data("cifar10")
    assert "images/cifar10 not found in" in str(error.value) and "official binary" in str(error.value)


def test_fashion_mnist_without_the_debian_package(places, monkeypatch, tmp_path):
    from distill.data import mnist

    monkeypatch.setattr(mnist, "FASHION_MNIST_DEBIAN", tmp_path / "not-installed")
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        build_data("fashion_mnist")
    fetched: list[Path] = []
    monkeypatch.setattr(mnist, "download_fashion_mnist", lambda root: fetched.append(root) or root)
    with pytest.raises(UserError, match="Fashion-MNIST folder not found"):  # the stand-in wrote nothing
        build_data("fashion_mnist", download=True)
    assert fetched == [places["cache"] / "fashion-mnist"]


# ----------------------------------------------------------------------------------------- test helpers


def test_require_data_skips_with_a_one_line_reason(places):
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_data("no/such/file.txt")
    reason = str(skipped.value)
    assert reason.startswith("data missing: no/such/file.txt not found in ") and "\n" not in reason


PROBE = """
import pytest
from data_helpers import require_data

def test_helper():
    require_data("no/such/file.txt")

@pytest.mark.skipif(True, reason="data missing: a marker's reason")
def test_marker():
    pass

def test_other_skip():
    pytest.skip("not about data")
"""


def test_ci_turns_missing_data_skips_into_failures(tmp_path):
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = dict(os.environ, DISTILL_REQUIRE_DATA="1", DISTILL_DATA=str(tmp_path / "none"))
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(TESTS.parent / "src"), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-p", "conftest"]
        + ["--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = run.stdout
    assert run.returncode == 1, out + run.stderr
    assert "1 failed, 1 skipped, 1 error" in out, out
    assert "FAILED test_probe.py::test_helper" in out and "ERROR test_probe.py::test_marker" in out, out
    assert "data missing: no/such/file.txt not found in $DISTILL_DATA" in out, out
    assert "data missing: a marker's reason (DISTILL_REQUIRE_DATA=1 makes it a failure)" in out, out
    assert "SKIPPED [1] test_probe.py:13: not about data" in out, out
