"""A NRRD header read only as far as needed to decide whether SimpleITK may be handed the file.

SimpleITK (ITK's NrrdIO) follows a header's ``data file:`` field blindly: ``../../etc/passwd``, an
absolute path, a FIFO (the reader then hangs) or ``/dev/zero`` (it reads the claimed size of zeros)
are all opened and read. So the text header is parsed here first, with the same line and field rules
as NrrdIO (lines end in ``\\n``, ``\\r\\n`` or ``\\r``; the header ends at the first empty line; field
names are case-insensitive, ``data file`` or ``datafile``; ``LIST`` names follow the field to the end
of the file; ``name%03d.raw MIN MAX STEP [DIM]`` patterns), every data file it names is checked with
``os.stat``/``os.path.realpath`` (nothing is opened), and only then does SimpleITK read the volume.
Where this parser cannot tell what NrrdIO would do (a NUL byte in the header, an unusual ``%``
pattern, an unknown encoding), the file is refused rather than guessed about.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, one_line

# The most header text read (a real header is well under 4 KiB; a LIST of slice files a few KiB more).
MAX_HEADER_BYTES = 64 * 2**10
# The most data files a LIST or a pattern may name (NrrdIO needs one per slice or slab).
MAX_DATA_FILES = 16384

# NrrdIO's type names (nrrdType airEnum, case-insensitive) -> bytes per value.
_TYPE_SIZES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t", "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int", "int64",
                     "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t",
                     "double"), 8),
}
# NrrdIO's encoding names -> one name each.
_ENCODINGS = {"raw": "raw", "txt": "text", "text": "text", "ascii": "text", "hex": "hex",
              "gz": "gzip", "gzip": "gzip", "bz2": "bzip2", "bzip2": "bzip2"}
# A pattern's one conversion: NrrdIO recognises '%', digits, 'd' (a zero-padded decimal number).
_PATTERN = re.compile(r"%(\d*)d")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# The fields this parser reads (normalised names); a second copy of one is refused.
_USED = ("type", "dimension", "sizes", "encoding", "byteskip", "lineskip", "datafile")


@dataclass
class NrrdHeader:
    """What the text header of a ``.nrrd`` / ``.nhdr`` says about its voxels and where they are.

    Attributes:
        sizes: voxels per axis, fastest first (as in the header).
        itemsize: bytes per value of the header's ``type``.
        encoding: ``raw``, ``gzip``, ``bzip2``, ``text`` or ``hex``.
        header_bytes: where attached data start (the byte after the empty line ending the header).
        byte_skip, line_skip: the header's ``byte skip`` / ``line skip`` (0 when absent).
        data_field: the raw value of the ``data file`` field (None: the data are attached).
        data_files: the file names that field expands to (as written, before joining the folder).
        file_dim: how many of the fastest axes one data file holds (NrrdIO's data file dimension).
    """

    sizes: tuple[int, ...]
    itemsize: int
    encoding: str
    header_bytes: int
    byte_skip: int = 0
    line_skip: int = 0
    data_field: str | None = None
    data_files: list[str] = field(default_factory=list)
    file_dim: int = 0

    @property
    def data_bytes(self) -> int:
        """Decoded bytes of all voxels together (sizes x type size)."""
        n = self.itemsize
        for s in self.sizes:
            n *= s
        return n


def shown(text: str) -> str:
    """A header value as it appears in a message: in quotes, control characters escaped, at most 120 characters."""
    text = one_line(text)
    return "'" + (text if len(text) <= 120 else text[:117] + "...") + "'"


def read_nrrd_header(path: Path) -> NrrdHeader:
    """Parse the text header of a ``.nrrd`` / ``.nhdr`` (at most :data:`MAX_HEADER_BYTES`) without following anything.

    Raises InputError for a missing ``NRRD000N`` magic, a header longer than the bound, a NUL byte in
    it, a missing or unreadable ``type`` / ``dimension`` / ``sizes`` / ``encoding`` field, or a
    ``data file`` field whose form NrrdIO would read differently from this parser.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not re.match(rb"NRRD000[1-9](\r\n|\r|\n)", head):
        raise InputError(f"{path}: not a NRRD file (missing 'NRRD000N' magic line)")
    lines: list[str] = []
    pos = 0
    end = None  # offset of the first byte after the header's empty line
    for m in _LINE_END.finditer(head):
        if m.end() > MAX_HEADER_BYTES:
            break
        line = head[pos:m.start()]
        pos = m.end()
        if not line:  # an empty line ends the header
            end = pos
            break
        lines.append(line.decode("latin-1"))
    if end is None:
        if len(head) > MAX_HEADER_BYTES:
            raise InputError(f"{path}: NRRD header longer than {MAX_HEADER_BYTES // 1024} KiB (no empty line ends it)")
        if pos < len(head):
            lines.append(head[pos:].decode("latin-1"))  # an unfinished last line (NrrdIO drops it; checking it costs nothing)
    header_bytes = end if end is not None else len(head)
    if b"\0" in head[:header_bytes]:
        # NrrdIO's C strings end at a NUL: it would read another field value than this parser does.
        raise InputError(f"{path}: NUL byte in the NRRD header")

    fields: dict[str, str] = {}
    list_names: list[str] | None = None
    for i, line in enumerate(lines[1:], start=1):
        if line.startswith("#") or ": " not in line:
            continue  # comments and key:=value pairs; NrrdIO rejects anything else itself
        key, value = line.split(": ", 1)
        # Case-insensitive with spaces, tabs, '_' and '-' dropped: "Data File", "datafile" and
        # "data  file" all count (more spellings than NrrdIO accepts, never fewer).
        key = re.sub(r"[ \t_-]", "", key.lower())
        value = value.lstrip(" \t")  # NrrdIO skips these after ": " and keeps trailing ones
        if key in _USED and key in fields:
            raise InputError(f"{path}: NRRD header field {shown(key)} given twice")
        fields[key] = value
        if key == "datafile" and value.startswith("LIST") and "%" not in value:
            # LIST (NrrdIO: a case-sensitive prefix): every following line, to the end of the
            # file, names one data file; an empty line would be an empty name.
            if end is not None:
                raise InputError(f"{path}: NRRD 'data file: LIST' must be the last field, its names "
                                 "running to the end of the file without an empty line")
            list_names = lines[i + 1:]
            break

    def need(key: str, label: str) -> str:
        if key not in fields:
            raise InputError(f"{path}: NRRD header lacks the '{label}' field")
        return fields[key].strip(" \t")

    type_name = " ".join(need("type", "type").lower().split())
    if type_name not in _TYPE_SIZES:
        raise InputError(f"{path}: unsupported NRRD type {shown(type_name)}")
    try:
        dimension = int(need("dimension", "dimension"))
        sizes = tuple(int(s) for s in need("sizes", "sizes").split())
    except ValueError:
        raise InputError(f"{path}: unreadable NRRD 'dimension' or 'sizes' field") from None
    if not 1 <= dimension <= 16 or len(sizes) != dimension or min(sizes) < 1:
        raise InputError(f"{path}: NRRD 'sizes' ({one_line(fields['sizes'])}) does not give "
                         f"{dimension} positive sizes")
    encoding = _ENCODINGS.get(need("encoding", "encoding").lower())
    if encoding is None:
        raise InputError(f"{path}: unsupported NRRD encoding {shown(fields['encoding'])} "
                         f"(reading {', '.join(sorted(set(_ENCODINGS.values())))})")
    try:
        byte_skip = int(fields.get("byteskip", "0").strip(" \t"))
        line_skip = int(fields.get("lineskip", "0").strip(" \t"))
    except ValueError:
        raise InputError(f"{path}: unreadable NRRD 'byte skip' or 'line skip' field") from None
    if line_skip < 0 or byte_skip < -1 or (byte_skip < 0 and encoding != "raw"):
        raise InputError(f"{path}: NRRD 'byte skip' {byte_skip} / 'line skip' {line_skip} not supported "
                         "(byte skip -1 only with raw encoding)")

    header = NrrdHeader(sizes=sizes, itemsize=_TYPE_SIZES[type_name], encoding=encoding,
                        header_bytes=header_bytes, byte_skip=byte_skip, line_skip=line_skip)
    if "datafile" in fields:
        header.data_field = fields["datafile"]
        header.data_files, header.file_dim = _data_files(path, header.data_field, list_names, dimension)
        _check_pieces(path, header)
    return header


def _data_files(path: Path, value: str, list_names: list[str] | None, dimension: int) -> tuple[list[str], int]:
    """(file names, data file dimension) for a ``data file`` field value: one name, a LIST or a pattern."""
    if list_names is not None:
        rest = value[4:].strip(" \t")
        file_dim = dimension - 1
        if rest:
            if not rest.isdigit() or not 1 <= int(rest) <= dimension:
                raise InputError(f"{path}: NRRD 'data file: LIST' dimension {shown(rest)} is not 1 to {dimension}")
            file_dim = int(rest)
        if not list_names or len(list_names) > MAX_DATA_FILES:
            raise InputError(f"{path}: NRRD 'data file: LIST' names {len(list_names)} files "
                             f"(between 1 and {MAX_DATA_FILES:,} are read)")
        return list_names, file_dim
    if "%" not in value:
        return [value], 0
    # NrrdIO takes a value as a pattern when its first '%' that is not '%%' is followed by digits
    # and 'd'; it then hands the format to C's sprintf. Anything else with a '%' in it (a second
    # conversion, '%s', flags) is refused: what sprintf would make of it is not a file name to trust.
    parts = re.split(r"[ \t]+", value.strip(" \t"))  # NrrdIO's separators exactly: the format ends at a space or tab
    fmt, numbers = parts[0], parts[1:]
    conversions = _PATTERN.findall(fmt.replace("%%", ""))
    leftover = _PATTERN.sub("", fmt.replace("%%", ""))
    if len(conversions) != 1 or "%" in leftover or not 3 <= len(numbers) <= 4:
        raise InputError(f"{path}: NRRD data file pattern {shown(value)} not supported "
                         "(expected NAME%0Nd.EXT MIN MAX STEP [DIM] with one %d)")
    try:
        lo, hi, step, *dim = (int(n) for n in numbers)
    except ValueError:
        raise InputError(f"{path}: NRRD data file pattern {shown(value)}: MIN MAX STEP must be integers") from None
    if step == 0 or (hi - lo) * step < 0:
        raise InputError(f"{path}: NRRD data file pattern {shown(value)}: STEP {step} does not go from {lo} to {hi}")
    count = (hi - lo) // step + 1
    if count > MAX_DATA_FILES:
        raise InputError(f"{path}: NRRD data file pattern names {count:,} files (at most {MAX_DATA_FILES:,} are read)")
    file_dim = dim[0] if dim else dimension - 1
    if not 1 <= file_dim <= dimension:
        raise InputError(f"{path}: NRRD data file pattern dimension {file_dim} is not 1 to {dimension}")
    width = conversions[0]

    def name(i: int) -> str:
        number = f"{i:0{width}d}" if width.startswith("0") else f"{i:{width}d}" if width else str(i)
        return _PATTERN.sub(lambda _: number, fmt.replace("%%", "\0"), count=1).replace("\0", "%")

    return [name(lo + k * step) for k in range(count)], file_dim


def _check_pieces(path: Path, header: NrrdHeader) -> None:
    """Refuse a LIST or pattern whose number of files does not split the volume as NrrdIO requires."""
    n = len(header.data_files)
    if header.file_dim == 0:
        return  # one file holds everything
    sizes, dim = header.sizes, len(header.sizes)
    if header.file_dim < dim:
        pieces = 1
        for s in sizes[header.file_dim:]:
            pieces *= s
        ok = pieces == n
    else:
        ok = n <= sizes[-1] and sizes[-1] % n == 0
    if not ok:
        raise InputError(f"{path}: NRRD header names {n} data files, which do not split its {' x '.join(map(str, sizes))} "
                         f"voxels into {header.file_dim}-D pieces")


def check_data_files(path: Path, header: NrrdHeader, *, allow_detached: bool = True) -> None:
    """Refuse detached data files that lie outside the header's folder, are not regular files, or have the wrong size.

    Only ``os.stat`` and ``os.path.realpath`` are used: nothing named by the header is opened, so a
    FIFO cannot block and a device cannot be read. A name is taken relative to the header's folder
    (as NrrdIO does), symbolic links are resolved, and the result must be a regular file inside that
    folder (subfolders included). With raw encoding and no skips, each file must hold exactly its
    share of the voxels. ``allow_detached=False`` (a viewer upload: a lone file has no folder)
    refuses any data file at all.
    """
    if header.data_field is None:
        return
    if not allow_detached:
        raise InputError(f"{path}: the header keeps its voxels in a separate data file ({shown(header.data_field)}); "
                         "upload a single .nrrd or .nii(.gz) that holds them")
    folder = os.path.dirname(os.path.abspath(path))
    real_folder = os.path.realpath(folder)
    share = header.data_bytes // len(header.data_files)  # NrrdIO splits the voxels evenly
    sizes = []
    for name in header.data_files:  # where and what every file is, before any size is judged
        where = shown(name)
        real = os.path.realpath(name if name.startswith("/") else os.path.join(folder, name))
        if real == real_folder:
            raise InputError(f"{path}: data file {where} is the header's folder, not a file")
        if os.path.commonpath([real, real_folder]) != real_folder:
            raise InputError(f"{path}: data file {where} lies outside the header's folder "
                             "(detached data must sit beside the header)")
        try:
            st = os.stat(real)
        except OSError as exc:
            raise InputError(f"{path}: data file {where}: {exc.strerror or 'cannot be read'}") from None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a special file")
            raise InputError(f"{path}: data file {where} is {kind}, not a regular file")
        sizes.append((where, st.st_size))
    if header.encoding != "raw":
        return  # compressed or text data: the decoder stops at the header's size
    low = share + max(header.byte_skip, 0)
    # byte skip -1 means "the last bytes of the file" (any size from the voxels up); line skip
    # "after some text lines" (bounded like a header); otherwise exactly the voxels and the skip.
    high = (None if header.byte_skip < 0 and header.line_skip == 0
            else low + MAX_HEADER_BYTES if header.line_skip else low)
    for where, size in sizes:
        if size < low or (high is not None and size > high):
            pieces = f" in {len(header.data_files)} files" if len(header.data_files) > 1 else ""
            needed = f"{low:,}" if low == high else f"at least {low:,}" if high is None else f"{low:,} to {high:,}"
            raise InputError(f"{path}: data file {where} holds {size:,} bytes; the header's raw "
                             f"{' x '.join(map(str, header.sizes))} voxels{pieces} need {needed}")


def check_attached_size(path: Path, header: NrrdHeader, file_size: int) -> None:
    """Refuse an attached raw NRRD shorter than its header says (checked before SimpleITK allocates)."""
    if header.data_field is None and header.encoding == "raw" and header.line_skip == 0 and header.byte_skip >= 0:
        need = header.header_bytes + header.byte_skip + header.data_bytes
        if file_size < need:
            raise InputError(f"{path}: truncated: the header needs {need:,} bytes with its data, the file holds {file_size:,}")
