"""The EXIF orientation tag, from a TIFF-structured EXIF block."""
from __future__ import annotations

import struct

# EXIF types Pillow reads the orientation from (SHORT, LONG, SBYTE, SSHORT, SLONG): the struct
# format of one value. A BYTE orientation comes out of Pillow as bytes and is not applied.
_EXIF_INTEGERS = {3: "H", 4: "I", 6: "b", 8: "h", 9: "i"}


def exif_orientation(tiff: bytes) -> int:
    """The orientation tag of IFD0 (1..8); 1 when absent, broken, or not one integer. Cameras
    write SHORT, some tools LONG: both count, as in Pillow's exif_transpose."""
    try:
        endian = {b"II": "<", b"MM": ">"}[tiff[:2]]
        ifd = struct.unpack(endian + "I", tiff[4:8])[0]
        (count,) = struct.unpack(endian + "H", tiff[ifd:ifd + 2])
        for i in range(count):
            entry = tiff[ifd + 2 + 12 * i: ifd + 14 + 12 * i]
            tag, typ, n = struct.unpack(endian + "HHI", entry[:8])
            if tag == 0x0112:
                if typ not in _EXIF_INTEGERS or n != 1:
                    return 1
                fmt = endian + _EXIF_INTEGERS[typ]
                (value,) = struct.unpack(fmt, entry[8:8 + struct.calcsize(fmt)])
                return value if 1 <= value <= 8 else 1
    except (KeyError, struct.error, IndexError):
        pass  # a broken EXIF block is ignored, as image viewers do
    return 1
