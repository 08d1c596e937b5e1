"""``lgseg serve`` against what it is sent (issue 27): a real server process, started as a user starts it, and the
HTTP requests its page makes (uploads are the page's ``POST upload``; the token and cookies as a browser sends them).

Hostile uploads: headers naming data files outside the upload (each header format ITK reads with detached data),
declared sizes past ``--max-voxels``, voxel types the viewer cannot show, long file names, and a bounded fuzz run of
a few hundred malformed files. Access: the token on loopback, the cookie per port, forwarded headers only from
``--trusted-proxy``. Disk: one folder per server, removed on SIGHUP, and by the next start after SIGKILL.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
import uuid
import zipfile
import zlib
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import numpy as np
import pytest
import SimpleITK as sitk

from test_web import APPROXIMATION_IMAGE, WebServer, _qata_image

SECRET = "lgseg-secret-data-outside-the-upload"


# ----------------------------------------------------------------------------------------------------------------
# Talking to the server as its page does
# ----------------------------------------------------------------------------------------------------------------


def _port(server: WebServer) -> int:
    return int(urlsplit(server.base).port or 0)


def _token(server: WebServer) -> Optional[str]:
    return server.url.split("token=", 1)[1] if "token=" in server.url else None


def _cookie(server: WebServer) -> dict:
    token = _token(server)
    return {"Cookie": f"lgseg_token_{_port(server)}={token}"} if token else {}


def _request(server: WebServer, method: str, path: str, body: bytes = b"", headers: Optional[dict] = None,
             source: Optional[str] = None) -> tuple[int, dict, bytes]:
    """One HTTP request to the server (from the loopback address ``source`` if given)."""
    connection = http.client.HTTPConnection("127.0.0.1", _port(server), timeout=60,
                                            source_address=(source, 0) if source else None)
    try:
        connection.request(method, path, body=body or None, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def upload(server: WebServer, *files: tuple[str, bytes]) -> tuple[int, dict]:
    """POST the files as the page's upload does (a folder: names with the folder's relative path)."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{name}\"\r\n"
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n" for name, data in files
    ) + f"--{boundary}--\r\n".encode()
    status, _, answer = _request(server, "POST", "/upload", body,
                                 {"Content-Type": f"multipart/form-data; boundary={boundary}", **_cookie(server)})
    return status, json.loads(answer) if answer else {}


def refused(server: WebServer, *files: tuple[str, bytes]) -> str:
    """The one-line message of an upload that must be refused; checks that it shows no server path."""
    status, answer = upload(server, *files)
    assert status in (400, 413) and set(answer) == {"error"}, (files[0][0][:80], status, answer)
    message = answer["error"]
    assert "\n" not in message and "Traceback" not in message
    folder = str(server.uploads.parent)
    assert folder not in message and "/tmp/" not in message and str(Path.home()) not in message, message
    return message


def opened(server: WebServer, *files: tuple[str, bytes]) -> None:
    status, answer = upload(server, *files)
    assert status == 200 and answer == {"files": len(files)}, answer


def kept(server: WebServer) -> list[str]:
    """The upload folders on the server's disk."""
    return sorted(path.name for path in server.uploads.iterdir())


def rss_mb(server: WebServer, field: str = "VmHWM") -> float:
    """The server process's peak (VmHWM) or current (VmRSS) resident memory."""
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith(field))) / 1024


def settled_peak_mb(server: WebServer) -> float:
    """The peak memory once the server's memory has stopped growing (the model it loads after the first image)."""
    samples = [rss_mb(server, "VmRSS")]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (len(samples) < 4 or max(samples[-4:]) - min(samples[-4:]) > 5):
        time.sleep(0.5)
        samples.append(rss_mb(server, "VmRSS"))
    return rss_mb(server)


# ----------------------------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------------------------


def encoded(array: np.ndarray, suffix: str, tmp: Path, **write: object) -> bytes:
    """``array`` written by SimpleITK in the format of ``suffix``."""
    path = tmp / f"image-{uuid.uuid4().hex[:8]}{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path), **write)
    data = path.read_bytes()
    path.unlink()
    return data


def meta_header(data_file: str, size: str = "8 8") -> bytes:
    dims = len(size.split())
    return (f"ObjectType = Image\nNDims = {dims}\nDimSize = {size}\nElementType = MET_UCHAR\n"
            f"ElementDataFile = {data_file}\n").encode()


def nrrd_header(data_file: str, sizes: str = "8 8") -> bytes:
    return (f"NRRD0004\ntype: uchar\ndimension: {len(sizes.split())}\nsizes: {sizes}\nencoding: raw\n"
            f"data file: {data_file}\n").encode()


def nifti_with_dims(dims: tuple[int, ...], datatype: Optional[int] = None) -> bytes:
    """A small NIfTI-1 whose header declares ``dims`` (and ``datatype``); the voxels are not there."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, len(dims), *dims, *([1] * (7 - len(dims))))
    code, bits = {None: (4, 16), 1280: (1280, 64), 1792: (1792, 128)}[datatype]
    struct.pack_into("<hh", header, 70, code, bits)
    struct.pack_into("<8f", header, 76, 1, *([1.0] * 7))
    struct.pack_into("<f", header, 108, 352.0)
    header[344:348] = b"n+1\0"
    return bytes(header) + b"\0" * 4 + b"\0" * 4096


# ----------------------------------------------------------------------------------------------------------------
# One server for the upload checks
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secret(tmp_path_factory) -> Path:
    """A file outside every upload that a hostile header names as its data."""
    path = tmp_path_factory.mktemp("outside") / "secret.raw"
    path.write_bytes(SECRET.encode().ljust(64 * 64, b"!"))
    (path.parent / "secret1.raw").write_bytes(path.read_bytes())  # for the numbered forms
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    started = WebServer(tmp_path_factory.mktemp("server"), "--model", "qata-cxr")
    yield started
    assert started.stop() == 0
    assert not started.uploads.parent.exists(), "the server's folder was left after SIGTERM"


def test_fuzz_hostile_uploads_each_get_one_message_and_leave_nothing(server, secret, tmp_path):
    """A few hundred malformed or hostile uploads: each gets one message naming no server path; afterwards the
    server still serves, keeps nothing of them on disk, and its peak memory has not grown."""
    rng = random.Random(27)
    png = encoded(rng.getrandbits(8) * np.ones((16, 16), np.uint8), ".png", tmp_path)
    seeds = {
        "scan.png": png,
        "scan.jpg": encoded(np.full((16, 16), 90, np.uint8), ".jpg", tmp_path),
        "scan.nii.gz": encoded(np.ones((4, 8, 8), np.int16), ".nii.gz", tmp_path),
        "scan.nii": encoded(np.ones((4, 8, 8), np.int16), ".nii", tmp_path),
        "scan.nrrd": encoded(np.ones((4, 8, 8), np.int16), ".nrrd", tmp_path, useCompression=True),
        "scan.mha": encoded(np.ones((4, 8, 8), np.int16), ".mha", tmp_path, useCompression=True),
        "scan.tif": encoded(np.ones((16, 16), np.uint16), ".tif", tmp_path),
    }
    hostile: list[tuple[str, bytes]] = []
    for name, data in seeds.items():
        suffix = name[name.index("."):]
        # Cut off within the header and within the voxels.
        for fraction in (0.02, 0.1, 0.3, 0.5, 0.7, 0.9):
            hostile.append((f"cut-{fraction}{suffix}", data[:max(1, int(len(data) * fraction))]))
        # Another format's name, and garbage under this one's.
        hostile.append((f"renamed{'.png' if suffix != '.png' else '.nii'}", data[:len(data) // 2]))
        for _ in range(10):
            noise = bytes(rng.getrandbits(8) for _ in range(rng.choice((0, 1, 7, 300, 5000))))
            hostile.append((f"noise{suffix}", noise))
        # Flipped bytes in the first 64 (the header), and the file cut short after them.
        for _ in range(8):
            flipped = bytearray(data)
            for _ in range(4):
                flipped[rng.randrange(min(64, len(flipped)))] ^= 1 << rng.randrange(8)
            hostile.append((f"flipped{suffix}", bytes(flipped[:len(flipped) * 3 // 4])))
    # Huge declared sizes: from the header, before any voxel is read.
    for dims in ((30000, 30000, 30000), (1024, 1024, 512), (32767, 32767), (2, 2, 2, 32000, 32000), (8, -8, 8)):
        for compress in (False, True):
            data = nifti_with_dims(dims)
            hostile.append((f"huge{'.nii.gz' if compress else '.nii'}", gzip.compress(data) if compress else data))
    for sizes in ("100000 100000 100000", "4000000000 4000000000"):
        hostile.append(("huge.nrrd", nrrd_header("", sizes).replace(b"data file: \n", b"\n") + b"\0" * 64))
        hostile.append(("huge.nhdr", nrrd_header("huge.raw", sizes)))
        hostile.append(("huge.mha", meta_header("LOCAL", sizes) + b"\0" * 64))
    # A gzip bomb's header: a valid size, a stream that decompresses far past it is read only as far as needed.
    hostile.append(("bomb.nii.gz", gzip.compress(nifti_with_dims((8, 8, 8))[:348] + b"\0" * (64 << 20))))
    # Archives (never unpacked), nested.
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w") as archive:
        archive.writestr("scan.png", png)
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as archive:
        archive.writestr("inner.zip", inner.getvalue())
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w:gz") as archive:
        entry = tarfile.TarInfo("scan.png")
        entry.size = len(png)
        archive.addfile(entry, io.BytesIO(png))
    for name, data in (("scan.zip", inner.getvalue()), ("nested.zip", outer.getvalue()),
                       ("scan.tar.gz", tar.getvalue()), ("scan.nii.gz", outer.getvalue()),
                       ("double.nii.gz", gzip.compress(gzip.compress(png))), ("scan.png.gz", gzip.compress(png)),
                       ("scan.nii.gz", zlib.compress(png))):
        hostile.append((name, data))
    # Headers naming data outside the upload.
    for reference in (str(secret), "../secret.raw", "../../pid", "/proc/self/environ", "/etc/passwd"):
        hostile += [("x.mhd", meta_header(reference)), ("x.mha", meta_header(reference)),
                    ("x.nhdr", nrrd_header(reference)), ("x.nrrd", nrrd_header(reference) + b"\n")]
    for _ in range(50):
        text = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 80))).decode("latin-1").replace("\n", " ")
        hostile += [("r.mhd", meta_header(text)), ("r.nhdr", nrrd_header(text))]
    assert len(hostile) >= 300

    # An image first, so that the model the server loads after it is in memory before the baseline.
    opened(server, ("chest.png", _qata_image(APPROXIMATION_IMAGE).read_bytes()))
    baseline = settled_peak_mb(server)
    started = time.perf_counter()
    for name, data in hostile:
        status, answer = upload(server, (name, data))
        # A few mutations leave a readable image (flipped bits in an unused header field): one answer either way.
        assert (status, answer) == (200, {"files": 1}) or status in (400, 413) and set(answer) == {"error"}, \
            (name, status, answer)
        if status != 200:
            message = answer["error"]
            assert "\n" not in message and str(server.uploads.parent) not in message and "/tmp/" not in message, \
                (name, message)
            assert SECRET not in message
    elapsed = time.perf_counter() - started
    grown = rss_mb(server) - baseline
    print(f"{len(hostile)} hostile uploads in {elapsed:.1f} s; peak memory {baseline:.0f} MB before, grew "
          f"{grown:.0f} MB")
    assert grown < 100, f"the server's peak memory grew {grown:.0f} MB"
    # Nothing of a refused upload is kept; at most the last readable one (the image in the page).
    assert len(kept(server)) == 1
    assert _request(server, "GET", "/index.html", headers=_cookie(server))[0] == 200
    opened(server, ("chest.png", _qata_image(APPROXIMATION_IMAGE).read_bytes()))
    assert len(kept(server)) == 1


@pytest.mark.parametrize("name, header", [
    ("absolute.mhd", lambda secret: meta_header(str(secret))),
    ("relative.mhd", lambda secret: meta_header("../" * 16 + str(secret).lstrip("/"))),  # up to / and down
    ("list.mhd", lambda secret: meta_header(f"LIST 2D\n{secret}", "8 8 1")),
    ("numbered.mhd", lambda secret: meta_header(f"{secret.parent}/secret%d.raw 1 1 1", "8 8 1")),
    ("detached.mha", lambda secret: meta_header(str(secret))),
    ("absolute.nhdr", lambda secret: nrrd_header(str(secret))),
    ("list.nhdr", lambda secret: nrrd_header(f"LIST 2\n{secret}", "8 8 1")),
    ("numbered.nhdr", lambda secret: nrrd_header(f"{secret.parent}/secret%d.raw 1 1 1 2", "8 8 1")),
    ("attached.nrrd", lambda secret: nrrd_header(str(secret)).replace(b"data file", b"datafile") + b"\n"),
    # A harmless field first, and the one the reader follows hidden behind a line end the reader does not see
    # (MetaIO ends lines at "\n" only) or under a spelling it does not match (MetaIO's names are case-sensitive).
    ("vt.mhd", lambda secret: meta_header(str(secret)).replace(
        b"ElementDataFile", b"Comment = x\x0bElementDataFile = LOCAL\nElementDataFile")),
    ("cr.mhd", lambda secret: meta_header(str(secret)).replace(
        b"ElementDataFile", b"Comment = x\rElementDataFile = LOCAL\nElementDataFile")),
    ("case.mhd", lambda secret: meta_header(str(secret)).replace(
        b"ElementDataFile", b"elementdatafile = LOCAL\nElementDataFile")),
])
def test_a_header_naming_data_outside_its_upload_is_refused(server, secret, name, header):
    """Each header form ITK follows to another file (MetaImage and NRRD: one name, LIST, numbered pattern): one
    message, and the file outside is never shown."""
    message = refused(server, (name, header(secret)))
    assert message.startswith(f"'{name}' names a data file outside the upload; only files uploaded together")
    assert SECRET not in message


def test_headers_with_their_data_files_open_as_one_folder(server, secret, tmp_path):
    """A header and its data files uploaded together (a folder) open; the header alone does not, nor do the
    formats that follow references ITK cannot be kept from (Stimulate, HDF5): they are not opened at all."""
    voxels = bytes(range(64))
    opened(server, ("scan/scan.mhd", meta_header("scan.raw")), ("scan/scan.raw", voxels))
    opened(server, ("vol/vol.nhdr", nrrd_header("LIST 2\nvol1.raw\nvol2.raw", "8 8 2")),
           ("vol/vol1.raw", voxels), ("vol/vol2.raw", voxels))
    opened(server, ("n/n.nhdr", nrrd_header("n%02d.raw 1 2 1 2", "8 8 2")), ("n/n01.raw", voxels),
           ("n/n02.raw", voxels))
    analyze = tmp_path / "pair.hdr"
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 8, 8), np.int16)), str(analyze))
    opened(server, ("pair/pair.hdr", analyze.read_bytes()), ("pair/pair.img", analyze.with_suffix(".img").read_bytes()))
    # An attached NRRD larger than the part of a header searched (1 MB): its header ends before the voxels.
    opened(server, ("large.nrrd", encoded(np.ones((8, 256, 256), np.int16), ".nrrd", tmp_path)))
    assert "'pair.hdr'" in refused(server, ("pair.hdr", analyze.read_bytes()))
    assert "'scan.mhd' names the data file 'scan.raw'" in refused(server, ("scan.mhd", meta_header("scan.raw")))
    # A data file beside it first, and the one outside behind a line end only Python sees (NRRD: "\r" and "\n").
    hidden = nrrd_header(str(secret)).replace(b"data file", b"# x\x85data file: scan.raw\ndata file")
    assert "'hidden.nhdr' names a data file outside the upload" in \
        refused(server, ("h/hidden.nhdr", hidden), ("h/scan.raw", voxels))
    for name, data in (("scan.spr", f"numDim: 2\ndim: 8 8\ndataType: BYTE\nstimFileName: {secret}\n"
                                    .encode()),
                       ("scan.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 600), ("scan.vtk", b"# vtk DataFile Version 3.0\n")):
        assert "it is not a file type the page opens" in refused(server, (name, data))
    assert len(kept(server)) == 1  # the last image opened; each before it was deleted when it was replaced


def test_size_and_voxel_type_are_checked_before_the_page_shows_an_image(server, tmp_path):
    """Issue defect 3 (a 1 MB .nii.gz declaring 1024 x 1024 x 512 voxels took 3.2 GB) and uint64 images."""
    before = rss_mb(server)
    message = refused(server, ("big.nii.gz", gzip.compress(nifti_with_dims((1024, 1024, 512)) + b"\0" * (1 << 20))))
    assert message.startswith("'big.nii.gz' is 1024 x 1024 x 512 = 536,870,912 voxels, more than the limit of "
                              "524,288,000 (--max-voxels)")
    # Under the voxel limit, over the memory it allows (complex doubles: 16 bytes a voxel).
    assert "GB of memory" in refused(server, ("complex.nii", nifti_with_dims((800, 800, 300), datatype=1792)))
    assert rss_mb(server) - before < 100  # refused from the header: no voxel read (they would need 1 and 3 GB)

    wide = np.zeros((4, 8, 8), np.uint64)
    wide[0, 0, 0] = 2 ** 40
    assert "64-bit unsigned integer voxels beyond the 32-bit range, which the viewer cannot show" in \
        refused(server, ("wide.nrrd", encoded(wide, ".nrrd", tmp_path)))
    assert "complex voxels, which the viewer cannot show" in \
        refused(server, ("complex.nrrd", encoded(np.zeros((4, 8, 8), np.complex64), ".nrrd", tmp_path)))
    opened(server, ("small-values.nrrd", encoded(np.arange(256, dtype=np.uint64).reshape(4, 8, 8), ".nrrd", tmp_path)))


def test_messages_name_the_users_file_even_a_300_character_one(server):
    long_name = "a-very-long-name-" * 17 + ".png"
    assert len(long_name) > 290
    message = refused(server, (long_name, b"not a png"))
    assert message.startswith(f"cannot read '{long_name[:45]}...{long_name[-32:]}': it is not a file type")
    assert "OSError" not in message
    # A folder upload's messages name the folder as the user chose it.
    message = refused(server, ("my-series/IM0001", b"not DICOM"), ("my-series/IM0002", b"not DICOM either"))
    assert "folder 'my-series' contains no DICOM series" in message


# ----------------------------------------------------------------------------------------------------------------
# Access
# ----------------------------------------------------------------------------------------------------------------


def test_the_token_is_required_on_loopback_and_its_cookie_is_this_servers(server):
    token = _token(server)
    assert token is not None and len(token) >= 43, "the printed address carries no token"
    assert _request(server, "GET", "/")[0] == 403
    status, headers, _ = _request(server, "GET", f"/?token={token}")
    assert status == 302 and headers["Set-Cookie"].startswith(f"lgseg_token_{_port(server)}={token};")
    assert _request(server, "GET", "/index.html", headers=_cookie(server))[0] == 200
    # The same token under another server's cookie name, or the old shared name, opens nothing.
    for name in ("lgseg_token", f"lgseg_token_{_port(server) + 1}"):
        assert _request(server, "GET", "/index.html", headers={"Cookie": f"{name}={token}"})[0] == 403


def test_forwarded_host_is_ignored_without_trusted_proxy(server):
    """A client naming its own host in X-Forwarded-Host or Forwarded cannot pass the Origin check."""
    for forwarded in ({"X-Forwarded-Host": "proxy.example"}, {"Forwarded": "host=proxy.example;proto=https"}):
        headers = {**_cookie(server), "Origin": "http://proxy.example", **forwarded}
        assert _request(server, "GET", "/index.html", headers=headers)[0] == 403


def test_serve_refuses_unsafe_access_options_in_one_line():
    for args, message in ((["--host", "0.0.0.0", "--no-token"], "--no-token is for loopback addresses only"),
                          (["--token", "x" * 31], "--token must be at least 32 characters"),
                          (["--token", "x" * 40, "--no-token"], "either --token or --no-token"),
                          (["--trusted-proxy", "proxy.example"], "--trusted-proxy 'proxy.example' is not an IP"),
                          (["--max-voxels", "lots"], "--max-voxels 'lots' is not a voxel count")):
        result = subprocess.run([sys.executable, "-m", "languageguidedseg.cli", "serve", *args],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, \
            result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------------------------------------------
# The server's folder: signals, a killed server, trame-slicer's temporary folder
# ----------------------------------------------------------------------------------------------------------------


def test_trusted_proxy_no_token_and_the_server_folder_after_sigkill_and_sighup(tmp_path):
    (tmp_path / "first").mkdir()
    first = WebServer(tmp_path / "first", "--no-token", "--trusted-proxy", "127.0.0.2", "--max-upload", "1MB")
    killed_folder = first.uploads.parent
    try:
        assert _token(first) is None and _request(first, "GET", "/index.html")[0] == 200  # --no-token: loopback
        # Forwarded headers count from the trusted proxy's address only.
        proxied = {"Origin": "https://proxy.example", "X-Forwarded-Host": "proxy.example"}
        assert _request(first, "GET", "/index.html", headers=proxied, source="127.0.0.2")[0] == 200
        assert _request(first, "GET", "/index.html", headers=proxied, source="127.0.0.1")[0] == 403
        standard = {"Origin": "https://proxy.example", "Forwarded": "for=10.0.0.7;host=proxy.example;proto=https"}
        assert _request(first, "GET", "/index.html", headers=standard, source="127.0.0.2")[0] == 200
        assert _request(first, "GET", "/index.html", headers=standard, source="127.0.0.1")[0] == 403
        # An image in the page, and trame-slicer's scene cache, both inside the server's folder.
        opened(first, ("chest.png", _qata_image(APPROXIMATION_IMAGE).read_bytes()))
        assert kept(first) and any((killed_folder / "tmp").iterdir())
        # The disk is capped at twice --max-upload: the image shown, one upload in progress, and no more.
        opened(first, ("ct.nii", encoded(np.ones((8, 200, 200), np.int16), ".nii", tmp_path)))  # 640 kB shown
        size = 800 * 1024  # under --max-upload; with the image shown and the slow upload, over twice that
        boundary = uuid.uuid4().hex
        slow = http.client.HTTPConnection("127.0.0.1", _port(first), timeout=60)
        slow.putrequest("POST", "/upload")
        slow.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
        slow.putheader("Content-Length", str(size + 400))
        slow.endheaders()
        slow.send(f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"slow.nii\"\r\n\r\n"
                  .encode() + b"\0" * size)  # all but the end of the body: the upload stays in progress
        deadline = time.monotonic() + 30
        while sum(path.stat().st_size for path in first.uploads.glob("*/slow.nii")) < size - 128 * 1024:
            assert time.monotonic() < deadline, "the server did not receive the slow upload"
            time.sleep(0.1)
        status, answer = upload(first, ("second.nii", b"\0" * size))
        assert status == 413 and "as much as it keeps on disk (2 MB, twice --max-upload)" in answer["error"]
        slow.close()
        deadline = time.monotonic() + 30
        while len(kept(first)) > 1:  # the broken-off upload is deleted when the server notices
            assert time.monotonic() < deadline, f"an interrupted upload was kept: {kept(first)}"
            time.sleep(0.1)
        # Each file counts as at least a file-system block: many empty files are refused as one large file is.
        status, answer = upload(first, *((f"empty/{index}.dcm", b"") for index in range(300)))
        assert status == 413 and "larger than this server's limit of 1 MB" in answer["error"]
        assert len(kept(first)) == 1
        assert oct(killed_folder.stat().st_mode & 0o777) == "0o700"
    finally:
        os.kill(first.process.pid, signal.SIGKILL)  # no chance to clean up
        first.process.wait(timeout=30)
        first.stop()
    assert killed_folder.exists()

    (tmp_path / "second").mkdir()
    second = WebServer(tmp_path / "second")
    try:
        assert not killed_folder.exists(), "the killed server's folder was not removed at the next start"
        folder = second.uploads.parent
        opened(second, ("chest.png", _qata_image(APPROXIMATION_IMAGE).read_bytes()))
        os.kill(second.process.pid, signal.SIGHUP)  # the terminal closed
        second.process.wait(timeout=60)  # it stops, as on Ctrl+C
        assert not folder.exists(), "SIGHUP left the server's folder (the uploaded image) on disk"
    finally:
        second.stop()
