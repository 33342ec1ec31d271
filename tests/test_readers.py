"""Hostile NRRD/NIfTI headers: detached NRRD data files are checked before SimpleITK opens anything,
scaled NIfTI masks stay in their stored type, zero voxel sizes and sheared grids are refused, and an
error stays one line whatever the file is called."""

from __future__ import annotations

import gzip
import logging
import os
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from skullrec import io
from skullrec.errors import InputError, one_line
from skullrec.io import read_volume
from skullrec.viewer import helpers as V

SECRET = b"root:x:0:0:SECRET"


def _volume(shape=(6, 5, 4), seed=0) -> np.ndarray:
    return (np.random.default_rng(seed).random(shape) > 0.5).astype(np.uint8)


def _header(data_file: str | None, sizes=(6, 5, 4), end: str = "\n\n", newline: str = "\n") -> bytes:
    """A uint8 raw NRRD header (LPS, 0.5 x 0.5 x 2 mm) whose voxels are in ``data_file``."""
    lines = ["NRRD0004", "type: uint8", "dimension: 3", f"sizes: {' '.join(map(str, sizes))}",
             "space: left-posterior-superior", "space directions: (0.5,0,0) (0,0.5,0) (0,0,2)",
             "space origin: (10,-20,30)", "endian: little", "encoding: raw"]
    if data_file is not None:
        lines.append(f"data file: {data_file}")
    return (newline.join(lines) + end.replace("\n", newline)).encode("latin-1")


@pytest.fixture
def no_simpleitk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of SimpleITK's reader fail the test: refusals must come before it."""

    def reached(*args, **kwargs):
        raise AssertionError("SimpleITK was handed the file")

    monkeypatch.setattr(io.sitk, "ImageFileReader", reached)


# ------------------------------------------------------------------------------------------
# detached NRRD data that may be read
# ------------------------------------------------------------------------------------------


def test_detached_nhdr_single_list_pattern_and_gzip_read_like_the_attached_nrrd(tmp_path: Path) -> None:
    data = _volume()
    raw = data.tobytes(order="F")  # NRRD: the first axis varies fastest
    (tmp_path / "attached.nrrd").write_bytes(_header(None) + raw)
    ref = read_volume(tmp_path / "attached.nrrd")
    np.testing.assert_array_equal(io.to_source_grid(ref.data, ref.source), data)
    np.testing.assert_allclose(ref.source.affine[:3, 3], [-10, 20, 30])  # LPS origin -> RAS

    (tmp_path / "skull.raw").write_bytes(raw)
    (tmp_path / "skull.nhdr").write_bytes(_header("skull.raw"))
    (tmp_path / "dot.nhdr").write_bytes(_header("./skull.raw"))
    (tmp_path / "skull.nrrd").write_bytes(_header("skull.raw"))  # a .nrrd may name a data file too
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "in_sub.raw").write_bytes(raw)
    (tmp_path / "sub.nhdr").write_bytes(_header("sub/in_sub.raw"))
    (tmp_path / "abs.nhdr").write_bytes(_header(str(tmp_path / "skull.raw")))  # absolute, but inside
    slab = 6 * 5
    for k in range(4):
        (tmp_path / f"slice{k:03d}.raw").write_bytes(raw[k * slab:(k + 1) * slab])
    (tmp_path / "list.nhdr").write_bytes(_header("LIST", end="\n") + b"".join(
        f"slice{k:03d}.raw\n".encode() for k in range(4)))
    (tmp_path / "pattern.nhdr").write_bytes(_header("slice%03d.raw 0 3 1 2"))
    (tmp_path / "down.nhdr").write_bytes(_header("slice%03d.raw 3 0 -1 2"))  # files in reverse order
    (tmp_path / "skull.raw.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "gz.nhdr").write_bytes(_header("skull.raw.gz").replace(b"encoding: raw", b"encoding: gzip"))
    (tmp_path / "crlf.nhdr").write_bytes(_header("skull.raw", newline="\r\n"))
    for name in ["skull.nhdr", "dot.nhdr", "skull.nrrd", "sub.nhdr", "abs.nhdr", "list.nhdr", "pattern.nhdr",
                 "gz.nhdr", "crlf.nhdr"]:
        vol = read_volume(tmp_path / name)
        np.testing.assert_array_equal(vol.data, ref.data, err_msg=name)
        np.testing.assert_array_equal(vol.affine, ref.affine, err_msg=name)
    backwards = io.to_source_grid(read_volume(tmp_path / "down.nhdr").data, ref.source)
    np.testing.assert_array_equal(backwards, data[:, :, ::-1])


# ------------------------------------------------------------------------------------------
# detached NRRD data that must not be read
# ------------------------------------------------------------------------------------------


def _hostile(tmp_path: Path) -> Path:
    """A folder ``in`` beside a secret file, with symlinks, a FIFO and a subfolder inside it."""
    (tmp_path / "outside.raw").write_bytes(SECRET + b"\0" * (120 - len(SECRET)))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "ok.raw").write_bytes(bytes(120))
    (folder / "big.raw").write_bytes(bytes(121))
    (folder / "small.raw").write_bytes(bytes(119))
    (folder / "sub").mkdir()
    os.symlink(tmp_path / "outside.raw", folder / "link.raw")
    os.symlink("/dev/zero", folder / "zero.raw")
    os.mkfifo(folder / "fifo.raw")
    return folder


HOSTILE = [
    # (name, header bytes given the outside file's absolute path, what the error says)
    ("up.nrrd", lambda o: _header("../outside.raw"), "data file '../outside.raw' lies outside the header's folder"),
    ("deep.nhdr", lambda o: _header("sub/../../outside.raw"), "'sub/../../outside.raw' lies outside"),
    ("abs.nrrd", lambda o: _header(o), "outside.raw' lies outside the header's folder"),
    ("passwd.nhdr", lambda o: _header("/etc/passwd"), "data file '/etc/passwd' lies outside"),
    ("zero.nrrd", lambda o: _header("/dev/zero"), "data file '/dev/zero' lies outside"),
    ("link.nhdr", lambda o: _header("link.raw"), "data file 'link.raw' lies outside"),  # symlink resolved
    ("zlink.nhdr", lambda o: _header("zero.raw"), "data file 'zero.raw' lies outside"),
    ("fifo.nhdr", lambda o: _header("fifo.raw"), "data file 'fifo.raw' is a FIFO, not a regular file"),
    ("folder.nhdr", lambda o: _header("sub"), "data file 'sub' is a folder, not a regular file"),
    ("itself.nhdr", lambda o: _header("."), "data file '.' is the header's folder"),
    ("missing.nhdr", lambda o: _header("nope.raw"), "data file 'nope.raw': No such file or directory"),
    ("big.nhdr", lambda o: _header("big.raw"), "holds 121 bytes; the header's raw 6 x 5 x 4 voxels need 120"),
    ("small.nhdr", lambda o: _header("small.raw"), "holds 119 bytes"),
    ("spelling.nhdr", lambda o: _header(None, end="\n") + b"DataFile: ../outside.raw\n\n", "'../outside.raw' lies outside"),
    ("cr.nhdr", lambda o: _header("../outside.raw", newline="\r"), "'../outside.raw' lies outside"),
    ("crlf.nrrd", lambda o: _header("../outside.raw", newline="\r\n"), "'../outside.raw' lies outside"),
    ("unended.nhdr", lambda o: _header("../outside.raw", end=""), "'../outside.raw' lies outside"),
    ("list.nhdr", lambda o: _header("LIST", end="\n") + b"ok.raw\n../outside.raw\nok.raw\nok.raw\n",
     "'../outside.raw' lies outside"),
    ("listgap.nhdr", lambda o: _header("LIST", end="\n") + b"ok.raw\n\nok.raw\n", "'data file: LIST' must be the last field"),
    ("pattern.nhdr", lambda o: _header("../out%sde.raw 0 3 1"), "pattern '../out%sde.raw 0 3 1' not supported"),
    ("pattern_up.nhdr", lambda o: _header("../%03d.raw 0 3 1 2"), "data file '../000.raw' lies outside"),
    ("pattern_count.nhdr", lambda o: _header("ok%d.raw 0 2 1"), "names 3 data files, which do not split"),
    ("nul.nhdr", lambda o: _header("ok.raw\0../outside.raw"), "NUL byte in the NRRD header"),
    ("twice.nhdr", lambda o: _header("ok.raw", end="\n") + b"data file: ../outside.raw\n\n", "'datafile' given twice"),
    ("long.nhdr", lambda o: _header(None, end="\n") + b"#" * 70000 + b"\ndata file: ../outside.raw\n\n",
     "NRRD header longer than 64 KiB"),
    ("nomagic.nhdr", lambda o: b"NRRX0004\n" + _header("../outside.raw")[9:], "not a NRRD file"),
]


@pytest.mark.parametrize("name, make, message", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_data_files_are_refused_before_simpleitk_opens_anything(
        tmp_path: Path, no_simpleitk: None, name: str, make, message: str) -> None:
    folder = _hostile(tmp_path)
    path = folder / name
    path.write_bytes(make(str(tmp_path / "outside.raw")))
    with pytest.raises(InputError) as err:
        read_volume(path, threshold=0.5)
    msg = str(err.value)
    assert msg.startswith(f"{path}: ") and message in msg, msg
    assert "\n" not in msg and "SECRET" not in msg, msg


def test_header_values_in_messages_are_quoted_and_short(tmp_path: Path, no_simpleitk: None) -> None:
    path = tmp_path / "x.nhdr"
    path.write_bytes(_header("../\x1b[31mred\x7f" + "a" * 300 + ".raw"))
    with pytest.raises(InputError) as err:
        read_volume(path)
    msg = str(err.value)
    shown = "../\\x1b[31mred\\x7f"  # 18 characters once escaped, then 99 of the 300 a's: 117 and "..."
    assert f"'{shown}" + "a" * 99 + "...' lies outside" in msg, msg
    assert "\x1b" not in msg and len(msg) < len(str(path)) + 240  # 120 of the 300-character name


def test_viewer_upload_refuses_any_detached_data_file(monkeypatch: pytest.MonkeyPatch) -> None:
    def reached(*args, **kwargs):
        raise AssertionError("SimpleITK was handed the upload")

    monkeypatch.setattr(io.sitk, "ImageFileReader", reached)
    for data_file in ["case.raw", "my case.nrrd", "/dev/zero", "../../etc/passwd"]:
        with pytest.raises(InputError) as err:
            V.read_upload("my case.nrrd", _header(data_file) + bytes(120))
        msg = str(err.value)
        assert msg.startswith("my case.nrrd: the header keeps its voxels in a separate data file"), msg
        assert "skullrec-upload-" not in msg
    # A name with a newline still gives a one-line error.
    with pytest.raises(InputError) as err:
        V.read_upload("a\nb.nrrd", _header("x.raw"))
    assert str(err.value).startswith("a\\nb.nrrd: ") and "\n" not in str(err.value)


def test_an_attached_raw_nrrd_shorter_than_its_header_is_refused_before_simpleitk(tmp_path: Path, no_simpleitk: None) -> None:
    path = tmp_path / "short.nrrd"
    header = _header(None)
    path.write_bytes(header + bytes(100))
    with pytest.raises(InputError, match=rf"truncated: the header needs {len(header) + 120} bytes with its data, "
                                         rf"the file holds {len(header) + 100}$"):
        read_volume(path)


# ------------------------------------------------------------------------------------------
# NIfTI headers
# ------------------------------------------------------------------------------------------


def _nifti(path: Path, stored: np.ndarray, *, slope: float = 1.0, inter: float = 0.0) -> Path:
    """A .nii holding ``stored`` as it is with ``scl_slope`` / ``scl_inter`` (as a scanner writes it;
    nibabel's own writer would rescale the array)."""
    hdr = nib.Nifti1Image(stored, np.diag([-1.0, -1.0, 1.0, 1.0])).header
    hdr.set_data_dtype(stored.dtype)
    hdr.set_slope_inter(slope, inter)
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + bytes(4) + np.asarray(stored).tobytes(order="F"))
    return path


def test_scaled_nifti_masks_match_nibabel_and_stay_in_their_stored_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_SCALE_CHUNK", 1000)  # several slabs, the last one partial
    mask = _volume((20, 18, 16), seed=4)
    # uint8 {0, 2} x 0.5 -> {0, 1}; int16 {10, 12} x 0.5 - 5 -> {0, 1}
    for path, stored, slope, inter in [(tmp_path / "u8.nii", mask * 2, 0.5, 0.0),
                                       (tmp_path / "i16.nii.gz", (mask * 2 + 10).astype(np.int16), 0.5, -5.0)]:
        if path.suffix == ".gz":
            path.write_bytes(gzip.compress(_nifti(tmp_path / "tmp.nii", stored, slope=slope, inter=inter).read_bytes()))
        else:
            _nifti(path, stored, slope=slope, inter=inter)
        scaled = np.asanyarray(nib.load(str(path)).dataobj)
        assert scaled.dtype == np.float64 and set(np.unique(scaled)) == {0.0, 1.0}  # what nibabel gives
        vol = read_volume(path)
        np.testing.assert_array_equal(io.to_source_grid(vol.data, vol.source), mask)
        assert vol.data.dtype == np.uint8
    # A threshold applies to the scaled values, exactly as on nibabel's float64 array.
    grey = np.random.default_rng(5).integers(0, 256, size=(20, 18, 16), dtype=np.uint8)
    path = _nifti(tmp_path / "grey.nii", grey, slope=1 / 255, inter=0.0)
    expected = (np.asanyarray(nib.load(str(path)).dataobj) > 0.5).astype(np.uint8)
    vol = read_volume(path, threshold=0.5)
    np.testing.assert_array_equal(io.to_source_grid(vol.data, vol.source), expected)
    assert 0.4 < expected.mean() < 0.6
    # Non-binary scaled values are named by their scaled value.
    with pytest.raises(InputError, match=r"mask has values other than 0 and 1 \(e\.g\. 0\.5"):
        read_volume(_nifti(tmp_path / "half.nii", mask, slope=0.5))


def test_a_scaled_uint8_mask_costs_its_bytes_not_a_float64_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(io, "_SCALE_CHUNK", 4096)
    mask = _volume((64, 64, 64), seed=6)
    path = _nifti(tmp_path / "big.nii", mask * 2, slope=0.5)
    n = mask.size

    def peak(fn) -> int:
        tracemalloc.start()
        try:
            fn()
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    nibabel_peak = peak(lambda: np.asanyarray(nib.load(str(path)).dataobj))  # the measure sees float64
    ours = peak(lambda: read_volume(path))
    assert nibabel_peak >= 8 * n
    assert ours < 3 * n, (ours, n)  # the uint8 voxels, the uint8 mask, one small slab


def test_scaled_non_mask_read_is_checked_as_float64(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((1024, 1024, 300))
    hdr.set_data_dtype(np.uint8)
    hdr.set_slope_inter(0.5, 0.0)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    path = tmp_path / "scaled.nii"
    path.write_bytes(hdr.binaryblock + bytes(1004))
    with pytest.raises(InputError, match=r"header claims 1024 x 1024 x 300 voxels \(2\.3 GiB\)"):
        read_volume(path, mask=False)
    with pytest.raises(InputError, match="truncated"):  # as a mask it stays uint8: within the limit
        read_volume(path)


def test_zero_voxel_size_without_an_sform_is_refused(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    mask = _volume()
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])
    for code, value in [(1, 0.0), (1, np.nan), (0, 0.0)]:  # qform only; no orientation at all
        img = nib.Nifti1Image(mask, affine)
        img.header.set_qform(affine, code=code)
        img.header.set_sform(affine, code=0)
        img.header["pixdim"][2] = value
        path = tmp_path / f"q{code}.nii"
        img.header["vox_offset"] = 352
        path.write_bytes(img.header.binaryblock + bytes(4) + mask.tobytes(order="F"))
        with pytest.raises(InputError) as err:
            read_volume(path)
        assert f"voxel size (pixdim) 0.5, {value:g}, 2 is zero or not finite along axis 1" in str(err.value)
    # With an sform the geometry does not depend on pixdim: read, with nibabel's repair as a warning.
    img = nib.Nifti1Image(mask, affine)
    img.header.set_sform(affine, code=1)
    img.header["pixdim"][2] = 0.0
    img.header["vox_offset"] = 352
    path = tmp_path / "s.nii"
    path.write_bytes(img.header.binaryblock + bytes(4) + mask.tobytes(order="F"))
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        vol = read_volume(path)
    np.testing.assert_allclose(vol.source.affine, affine)
    assert any(f"warning: {path}: nibabel: pixdim[1,2,3] should be non-zero" in r.getMessage() for r in caplog.records)


def test_sheared_grids_are_refused_and_float32_rounding_is_not(tmp_path: Path) -> None:
    mask = _volume()
    sheared = np.diag([-0.5, -0.5, 2.0, 1.0])
    sheared[0, 2] = 0.6  # the third voxel axis tilts into the first (atan(0.6 / 2) = 16.7 degrees)
    img = nib.Nifti1Image(mask, sheared)
    img.header.set_sform(sheared, code=1)
    img.header["qform_code"] = 0
    nib.save(img, str(tmp_path / "sheared.nii"))
    with pytest.raises(InputError, match=r"sheared voxel grid \(axes 16\.7 degrees off perpendicular\)"):
        read_volume(tmp_path / "sheared.nii")
    nrrd = tmp_path / "sheared.nrrd"
    nrrd.write_bytes(_header(None).replace(b"(0,0,2)", b"(0.3,0,2)") + _volume().tobytes(order="F"))
    with pytest.raises(InputError, match="sheared voxel grid"):
        read_volume(nrrd)
    # An oblique grid stored as float32 (axes perpendicular to rounding) reads.
    a = np.deg2rad(20)
    oblique = np.eye(4)
    oblique[:3, :3] = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]]) @ np.diag([0.43, 0.43, 0.7])
    nib.save(nib.Nifti1Image(mask, oblique.astype(np.float32)), str(tmp_path / "oblique.nii"))
    np.testing.assert_allclose(read_volume(tmp_path / "oblique.nii").source.affine, oblique, atol=1e-6)


def test_one_line_keeps_one_line_and_plain_text() -> None:
    assert one_line("a\nb\r\x1b[0m\x85\u2028\udcff ok é/ü") == "a\\nb\\r\\x1b[0m\\x85\\u2028\\udcff ok é/ü"
    assert one_line("plain/path name.nii.gz") == "plain/path name.nii.gz"


def test_skipped_file_names_with_control_characters_stay_on_one_warning_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    io.write_nifti(tmp_path / "001.nii.gz", _volume(), np.eye(4))
    (tmp_path / "notes\nsecond line.txt").write_text("x")
    with caplog.at_level(logging.WARNING, logger="skullrec"):
        assert list(io.list_volumes(tmp_path)) == ["001"]
    (message,) = [r.getMessage() for r in caplog.records]
    assert "notes\\nsecond line.txt" in message and "\n" not in message
