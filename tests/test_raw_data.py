"""Raw files of the torchvision-backed recipes: damaged or misplaced files are named with their fix, the data
folder is never changed by a failure, and downloads fail fast and cleanly without a network."""

import http.server
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from conftest import cli, common, ok, write_mnist_raw

from pipeline import errors
from recipes import _raw_files

OMNIGLOT_ZIP = Path(__file__).parent / "data" / "omniglot-small" / "images_background_small1.zip"


def listing(root: Path) -> dict:
    """Every file and folder under `root` with its size and modification time: what "unchanged" means here."""
    return {
        str(p.relative_to(root)): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
    }


def refused(result) -> str:
    """The one-message exit of a data error: code 2, `error: ...`, no traceback, no run or shards left."""
    assert result.returncode == 2, f"expected exit 2, got {result.returncode}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    assert result.stderr.count("error: ") == 1, result.stderr
    return result.stderr


def nothing_made(workdir: Path) -> None:
    assert not (workdir / "runs").exists() and not list(workdir.glob("cache/**/meta.json"))


# ---------------------------------------------------------------- damaged and misplaced raw files


@pytest.mark.slow
def test_truncated_or_corrupt_mnist_gz_is_named_and_the_data_folder_is_untouched(workdir):
    root = write_mnist_raw(workdir / "data")
    gz = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    gz.write_bytes(gz.read_bytes()[: gz.stat().st_size // 2])  # an interrupted download
    before = listing(root)
    err = refused(cli(common(workdir, "recipe=mnist_mlp", f"data.root={root}"), cwd=workdir))
    assert str(gz) in err and "damaged" in err and "replace it with a good copy" in err and "data.download=true" in err
    assert listing(root) == before  # no 0-byte unpacked file beside it, nothing else either
    nothing_made(workdir)

    # Changed bytes inside a complete .gz: its CRC catches them.
    good = (write_mnist_raw(workdir / "good") / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2 : len(bad) // 2 + 200] = bytes(200)
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(bad)
    shutil.copy(root.parent / "good" / "MNIST" / "raw" / "train-images-idx3-ubyte.gz", gz)
    before = listing(root)
    err = refused(cli(common(workdir, "recipe=mnist_mlp", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert str(labels) in err and "damaged" in err
    assert listing(root) == before


@pytest.mark.slow
def test_raw_path_that_is_a_folder_or_a_bad_plain_file_is_named(workdir):
    root = write_mnist_raw(workdir / "data")
    raw = root / "MNIST" / "raw"
    (raw / "train-images-idx3-ubyte").mkdir()  # where the plain file would be read from
    before = listing(root)
    err = refused(cli(common(workdir, "recipe=mnist_cnn", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert f"{raw / 'train-images-idx3-ubyte'} is a folder" in err and "move that folder away" in err
    assert "download=True" not in err  # torchvision's misleading advice
    assert listing(root) == before

    # The 0-byte file an older unpack left beside its .gz: named, and the .gz is the way out.
    (raw / "train-images-idx3-ubyte").rmdir()
    (raw / "train-labels-idx1-ubyte").write_bytes(b"")
    before = listing(root)
    err = refused(cli(common(workdir, "recipe=mnist_cnn", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert f"{raw / 'train-labels-idx1-ubyte'} is not a readable IDX file" in err and "delete it" in err
    assert listing(root) == before
    nothing_made(workdir)


@pytest.mark.slow
def test_gz_is_read_without_unpacking_beside_it(workdir):
    root = write_mnist_raw(workdir / "data")
    before = listing(root)
    ok(cli(common(workdir, "recipe=mnist_mlp", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert listing(root) == before


# ---------------------------------------------------------------- omniglot's zip


@pytest.mark.slow
def test_omniglot_zip_is_read_in_place_and_a_damaged_one_is_named(workdir):
    """Also the README's first offline try: the subset's zip copied in as images_background.zip."""
    root = workdir / "data"
    root.mkdir()
    archive = root / "images_background.zip"
    shutil.copy(OMNIGLOT_ZIP, archive)
    before = listing(root)
    result = ok(cli(common(workdir, "recipe=omniglot_multi", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert "train 2,176, eval 544" in result.stdout  # 136 characters x 16 + 4 drawers
    assert listing(root) == before

    archive.write_bytes(OMNIGLOT_ZIP.read_bytes()[:700_000])
    before = listing(root)
    err = refused(cli(common(workdir, "recipe=omniglot_multi", f"data.root={root}"), cwd=workdir, script="prepare"))
    assert str(archive) in err and "damaged" in err and "images_background.zip" in err
    assert listing(root) == before


# ---------------------------------------------------------------- downloads


def network() -> bool:
    try:
        socket.getaddrinfo("ossci-datasets.s3.amazonaws.com", 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(network(), reason="this machine has a network: the download would succeed")
def test_download_without_network_fails_within_seconds(tmp_path):
    from torchvision.datasets import MNIST

    started = time.perf_counter()
    with pytest.raises(errors.DataError) as e:
        _raw_files.download(
            [
                (
                    "train-images-idx3-ubyte.gz",
                    [m + "train-images-idx3-ubyte.gz" for m in MNIST.mirrors],
                    dict(MNIST.resources)["train-images-idx3-ubyte.gz"],
                )
            ],
            tmp_path / "MNIST" / "raw",
            "MNIST",
        )
    assert time.perf_counter() - started < 30
    assert "could not be downloaded" in str(e.value) and "ossci-datasets" in str(e.value)
    assert list(tmp_path.iterdir()) == []  # no folder made for a file that never came


class Proxy(http.server.BaseHTTPRequestHandler):
    """A local HTTP proxy standing in for the network: tunnels (https) are refused, plain http requests get
    `body` (the wrong bytes for the file asked), or with `cut` half of the length it announces."""

    body, cut = b"", False

    def do_CONNECT(self):
        self.send_error(502)

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.body) * (2 if self.cut else 1)))
        self.end_headers()
        self.wfile.write(self.body)
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield proxy_env(url)
    server.shutdown()
    server.server_close()


def proxy_env(url: str) -> dict:
    """Environment that sends every download through `url` (urllib reads these variables)."""
    names = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
    return {k: url for k in names} | {"no_proxy": "", "NO_PROXY": ""}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


@pytest.mark.slow
def test_headline_command_downloads_by_default_and_says_where_files_go(workdir):
    # No network (every connection refused): one message listing the files, the folder and the URLs.
    env = proxy_env(f"http://127.0.0.1:{closed_port()}")
    started = time.perf_counter()
    err = refused(cli(common(workdir, "recipe=mnist_mlp"), cwd=workdir, env=env, timeout=120))
    assert time.perf_counter() - started < 120
    raw = (workdir / "data" / "MNIST" / "raw").resolve()
    assert "data.download is on, but MNIST raw files could not be downloaded" in err and str(raw) in err
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "data.download=false",
    ):
        assert name in err
    assert not (workdir / "data").exists()  # no folder made for a download that did not happen
    nothing_made(workdir)

    # Omniglot's default also downloads; the same kind of message.
    err = refused(cli(common(workdir, "recipe=omniglot_multi"), cwd=workdir, env=env, timeout=120))
    assert "Omniglot's images_background.zip could not be downloaded" in err
    assert str((workdir / "data" / "omniglot-py").resolve()) in err and "brendenlake/omniglot" in err
    assert "tests/data/omniglot-small/images_background_small1.zip" in err  # the subset for a first run offline
    assert not (workdir / "data").exists()


@pytest.mark.slow
def test_failed_download_leaves_no_partial_file(workdir, proxy):
    """A download that returns wrong bytes (md5) or breaks off midway adds nothing to the data folder."""
    root = write_mnist_raw(workdir / "data")
    raw = root / "MNIST" / "raw"
    (raw / "t10k-images-idx3-ubyte.gz").unlink()  # the one file to fetch; the others are the user's
    Proxy.body = (raw / "train-images-idx3-ubyte.gz").read_bytes()
    for cut in (False, True):
        Proxy.cut = cut
        before = listing(root)
        err = refused(
            cli(
                common(workdir, "recipe=mnist_cnn", f"data.root={root}"),
                cwd=workdir,
                env=proxy,
                script="prepare",
                timeout=120,
            )
        )
        assert "could not be downloaded" in err and "t10k-images-idx3-ubyte.gz" in err
        assert "train-images-idx3-ubyte.gz" not in err  # present files are not asked for
        assert listing(root) == before


@pytest.mark.slow
def test_download_false_names_the_files_and_where_they_go(workdir):
    err = refused(
        cli(
            common(workdir, "recipe=fashion_mnist_mlp", f"data.root={workdir / 'nothing'}", "data.download=false"),
            cwd=workdir,
        )
    )
    for word in [
        str(workdir / "nothing" / "FashionMNIST" / "raw"),
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        ".gz",
        "data.root",
        "data.download=true",
    ]:
        assert word in err
    assert not (workdir / "nothing").exists()


def test_a_download_is_placed_whole_under_a_name_of_its_own(tmp_path):
    src = tmp_path / "download" / "train.gz"
    src.parent.mkdir()
    src.write_bytes(b"\x1f\x8b" + bytes(range(256)) * 64)
    folder = tmp_path / "data" / "MNIST" / "raw"
    folder.mkdir(parents=True)
    (folder / ".train.gz.part").write_text("a person's file, or another machine's download in progress")
    _raw_files._place(src, folder / "train.gz")
    assert (folder / "train.gz").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in folder.iterdir()) == [".train.gz.part", "train.gz"]
    assert (folder / ".train.gz.part").read_text().startswith("a person's file")
